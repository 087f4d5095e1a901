"""No silent substitution: an adapter is evaluated on the base it was trained on, and a
user's model is not scored on the bundled task."""

from __future__ import annotations

import json
import shutil

from cli_utils import FAST, reference_run, run_main
from test_cli_errors import compiles  # noqa: F401 (fixture)

from jpeft.train.config import resolve_path


def eval_loss(stdout: str) -> float:
    return float(stdout.split("eval loss ")[1].split()[0])


def test_a_qlora_adapter_is_evaluated_on_its_nf4_base(tmp_path):
    out = tmp_path / "qlora"
    args = ("--method", "qlora", "--eval-samples", "0", "--output-dir", str(out))
    code, _, err = run_main("train", *FAST, *args)
    assert code == 0, err
    recorded = json.loads((out / "adapter" / "jpeft_base.json").read_text())
    assert recorded == {"quantization": {"quant_type": "nf4", "blocksize": 64,
                                         "double_quant": True}}  # fmt: skip

    code, from_run, err = run_main("eval", "--run", str(out), "--eval-samples", "0")
    assert code == 0, err
    adapter = str(out / "adapter")
    code, stdout, err = run_main("eval", "--adapter", adapter, "--eval-samples", "0")
    assert code == 0, err
    assert "was trained on a nf4 base: quantizing the base as recorded" in stdout
    assert eval_loss(stdout) == eval_loss(from_run)

    code, _, err = run_main("eval", "--adapter", adapter, "--quantize", "fp4")
    assert code == 2 and "was trained on a nf4 base" in err, err


def test_a_lora_adapter_refuses_a_quantized_base(compiles):  # noqa: F811
    _, reference = reference_run()
    assert json.loads((reference / "adapter" / "jpeft_base.json").read_text()) == {
        "quantization": None
    }
    compiles.clear()
    code, _, err = run_main("eval", "--adapter", str(reference / "adapter"), "--quantize", "nf4")
    assert code == 2 and "was trained on an unquantized base; drop --quantize nf4" in err, err
    assert compiles == []


def test_eval_of_another_model_asks_for_data(tmp_path, compiles):  # noqa: F811
    model = tmp_path / "my-model"
    shutil.copytree(resolve_path("assets/tiny-llama"), model)
    code, _, err = run_main("eval", "--model", str(model))
    assert code == 2, err
    assert f"jpeft eval --model {model} needs --eval-data FILE" in err
    assert compiles == []
