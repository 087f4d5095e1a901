"""``jpeft train | eval | generate | export`` end to end on the bundled model and task.

``reference_run()`` (from ``cli_utils``) is a 3-step LoRA run shared by the command-line tests.
"""

from __future__ import annotations

import importlib.metadata
import json
import os

import jax.numpy as jnp
import numpy as np
import peft
import pytest
import torch
import transformers
import yaml
from cli_utils import FAST, reference_run, run_main

import jpeft
from jpeft.models import hf, llama
from jpeft.models.tokenizer import Tokenizer
from jpeft.train import build, methods
from jpeft.train.cli import build_parser, run_config

MODEL = "assets/tiny-llama"


def test_train_reports_and_saves_everything():
    stdout, out = reference_run()
    assert "before training: eval loss" in stdout and "accuracy" in stdout
    assert "after training: eval loss" in stdout
    assert "sample: " in stdout and "adapter (peft format)" in stdout
    for name in ("run.yaml", "metrics.jsonl", "summary.json", "adapter/adapter_config.json"):
        assert (out / name).is_file(), name
    assert sorted(os.listdir(out / "checkpoints")) == ["3"]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3]
    assert all({"tokens_per_second", "grad_norm", "learning_rate"} <= set(r) for r in rows[1:4])
    assert [r["step"] for r in rows if "eval_loss" in r] == [0, 3]
    summary = json.loads((out / "summary.json").read_text())
    assert 0 < summary["trainable_params"] < summary["total_params"]
    assert summary["after"]["total"] == 4 and summary["peak_memory_bytes"] > 0


def test_help_documents_commands_and_every_method_option(capsys):
    with pytest.raises(SystemExit) as e:
        build_parser().parse_args(["train", "--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    for flag in (
        "--method",
        "--mesh",
        "--resume",
        "--coordinator",
        "--lora-r",
        "--lora-targets",
        "--adapter-bottleneck",
        "--llama-adapter-adapter-len",
        "--prefix-num-virtual-tokens",
        "--prompt-prompt-init",
        "--ptuning-encoder-type",
        "--ptuning-v2-num-virtual-tokens",
        "qlora options",
    ):
        assert flag in text, flag
    for command in ("eval", "generate", "export"):
        with pytest.raises(SystemExit):
            build_parser().parse_args([command, "--help"])
        assert "--adapter" in capsys.readouterr().out


@pytest.mark.parametrize("suffix", [".toml", ".yaml"])
def test_config_file_then_flags(tmp_path, suffix):
    path = tmp_path / f"run{suffix}"
    if suffix == ".toml":
        path.write_text(
            'method = "lora"\nsteps = 7\nlr = 0.01\n[lora]\nr = 4\ntargets = ["q_proj"]\n'
        )
    else:
        path.write_text("method: lora\nsteps: 7\nlr: 0.01\nlora:\n  r: 4\n  targets: [q_proj]\n")
    args = build_parser().parse_args(["train", "--config", str(path), "--steps", "5"])
    run = run_config(args)
    assert (run.steps, run.lr) == (5, 0.01)
    assert run.options() == {"r": 4, "targets": ("q_proj",)}
    args = build_parser().parse_args(["train", "--config", str(path), "--lora-targets", "v_proj"])
    assert run_config(args).options()["targets"] == ("v_proj",)


def test_generate_and_eval_commands():
    _, out = reference_run()
    code, stdout, _ = run_main(
        "generate", "--run", str(out), "--prompt", "Hello", "--max-new-tokens", "4"
    )
    assert code == 0 and "\nHello\n-> " in stdout
    code, stdout, _ = run_main("eval", "--adapter", str(out / "adapter"), "--eval-samples", "4")
    assert code == 0 and "accuracy" in stdout and "/4)" in stdout


def test_export_loads_in_peft_and_transformers(tmp_path):
    _, out = reference_run()
    code, _, err = run_main("export", "--run", str(out), "--out", str(tmp_path / "adapter"))
    assert code == 0, err
    code, _, err = run_main(
        "export", "--run", str(out), "--merged", "--out", str(tmp_path / "merged")
    )
    assert code == 0, err

    cfg, base = hf.load_pretrained(MODEL)
    _, params = jpeft.load_hf_adapter(tmp_path / "adapter", base, cfg)
    ids = np.array(Tokenizer.from_dir(MODEL).encode("Once upon a time, 1 2 3"), np.int32)[None]
    ours = np.asarray(llama.forward(params, cfg, jnp.asarray(ids)))
    torch_ids = torch.tensor(ids, dtype=torch.long)
    hf_base = transformers.LlamaForCausalLM.from_pretrained(MODEL, dtype=torch.float32)
    with torch.no_grad():
        peft_model = peft.PeftModel.from_pretrained(hf_base, str(tmp_path / "adapter")).eval()
        from_peft = peft_model(torch_ids).logits.numpy()
        merged = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "merged").eval()
        from_merged = merged(torch_ids).logits.numpy()
    np.testing.assert_allclose(from_peft, ours, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(from_merged, ours, rtol=1e-4, atol=1e-4)
    assert (tmp_path / "merged" / "tokenizer.json").is_file()


ONE_FLAG = {
    "lora": ("--lora-r", "4", "r", 4),
    "qlora": ("--qlora-blocksize", "32", "blocksize", 32),
    "adapter": ("--adapter-reduction-factor", "8", "reduction_factor", 8),
    "llama-adapter": ("--llama-adapter-adapter-len", "5", "adapter_len", 5),
    "prefix": ("--no-prefix-prefix-projection", None, "prefix_projection", False),
    "prompt": ("--prompt-num-virtual-tokens", "3", "num_virtual_tokens", 3),
    "ptuning": ("--ptuning-encoder-type", "LSTM", "encoder_type", "LSTM"),
    "ptuning-v2": ("--ptuning-v2-num-virtual-tokens", "7", "num_virtual_tokens", 7),
}


def test_every_method_has_a_case():
    assert sorted(ONE_FLAG) == sorted(methods.METHODS)


@pytest.mark.parametrize("name", list(ONE_FLAG))
def test_every_method_is_built_from_its_flags(name):
    flag, value, option, expected = ONE_FLAG[name]
    argv = ["train", "--method", name, flag, *([value] if value else [])]
    method = build.method(run_config(build_parser().parse_args(argv)))
    assert type(method) is methods.METHODS[name].load()
    assert getattr(method, option) == expected


def test_own_training_data_is_evaluated_on_a_split_of_it_not_on_the_bundled_task(tmp_path):
    path = tmp_path / "mine.jsonl"
    rows = [{"instruction": f"Repeat {i}", "input": "", "output": str(i)} for i in range(8)]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    out = tmp_path / "run"
    code, stdout, err = run_main(
        "train", *FAST, "--train-data", str(path), "--output-dir", str(out)
    )
    assert code == 0, err
    assert f"7 training and 1 held-out examples (split off {path})" in stdout
    assert "Sort the digits" not in stdout
    assert yaml.safe_load((out / "run.yaml").read_text())["eval_data"] is None


def test_version_is_the_installed_distributions():
    code, stdout, _ = run_main("--version")
    assert code == 0
    assert jpeft.__version__ == importlib.metadata.version("jpeft")
    assert stdout == f"jpeft {jpeft.__version__}\n"
