"""Bad input to ``jpeft`` fails with a clear message, before anything is compiled."""

from __future__ import annotations

import dataclasses

import jax
import pytest
from cli_utils import FAST, run_main

from jpeft.train import methods

COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"


@pytest.fixture
def compiles():
    """A list that records every XLA compilation while the test runs."""
    seen: list[str] = []

    def listener(event: str, duration: float, **kwargs) -> None:
        if event == COMPILE_EVENT:
            seen.append(event)

    jax.monitoring.register_event_duration_secs_listener(listener)
    yield seen
    jax.monitoring.unregister_event_duration_listener(listener)


def bad_jsonl(tmp_path):
    path = tmp_path / "bad.jsonl"
    lines = ['{"prompt": "a", "response": "b"}', '{"prompt": "c", "response": "d"}', '{"prompt": ']
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def unknown_key_config(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text("stpes = 10\n")
    return str(path)


CASES = {
    "missing model": (lambda p: ["--model", str(p / "nope")], "model directory not found"),
    "malformed jsonl": (lambda p: ["--train-data", bad_jsonl(p)], "bad.jsonl:3: invalid JSON"),
    "unknown config key": (
        lambda p: ["--config", unknown_key_config(p)],
        "unknown option 'stpes'; did you mean 'steps'",
    ),
    "seq_len over context": (lambda p: ["--seq-len", "100000"], "longer than the model's context"),
    "example over seq_len": (lambda p: ["--seq-len", "8"], "more than the maximum of 8"),
    "bad option value": (lambda p: ["--lora-r", "many"], "lora.r: expected int, found 'many'"),
    "bad method option": (lambda p: ["--lora-r", "0"], "--method lora: LoRA: r must be"),
    "bad mesh": (lambda p: ["--mesh", "data=3"], "devices"),
    "batch not divisible": (lambda p: ["--batch-size", "6", "--grad-accum", "4"], "multiple"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_fails_before_compiling(case, tmp_path, compiles):
    make_args, message = CASES[case]
    code, _, err = run_main(
        "train", *FAST, "--output-dir", str(tmp_path / "run"), *make_args(tmp_path)
    )
    assert code == 2, err
    assert message in err, err
    assert err.startswith("jpeft train: error: ")
    assert compiles == [], "an error must come before any compilation"
    assert not (tmp_path / "run").exists()


def test_unknown_flag_is_a_usage_error():
    code, _, err = run_main("train", "--lerning-rate", "0.1")
    assert code == 2 and "unrecognized arguments: --lerning-rate" in err


def test_unavailable_method_is_a_clear_error(monkeypatch, compiles):
    """A listed method whose jpeft class is missing (as QLoRA before it lands)."""
    missing = dataclasses.replace(methods.METHODS["qlora"], target="jpeft:NotYetThere")
    monkeypatch.setitem(methods.METHODS, "qlora", missing)
    code, _, err = run_main("train", "--method", "qlora")
    assert code == 2, err
    assert "--method qlora: jpeft.NotYetThere is not available" in err
    assert "available methods: lora" in err
    assert compiles == []


def test_soft_prompts_refuse_packing(compiles):
    code, _, err = run_main("train", "--method", "prompt", "--packing")
    assert code == 2 and "--packing cannot be used with --method prompt" in err
    assert compiles == []
