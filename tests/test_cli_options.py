"""Every generated flag takes what its help says; bad option values fail before compiling."""

from __future__ import annotations

import argparse

import pytest
from cli_utils import FAST, run_main

from jpeft.train import build, config, methods
from jpeft.train.cli import build_parser, run_config
from jpeft.train.values import list_item_type

SAMPLES = {int: ["1"], float: ["0.5"], str: ["x"]}


def _types() -> dict[str, object]:
    """``{argparse dest: declared type}`` of every generated ``jpeft train`` flag."""
    out = {f"run.{name}": tp for name, tp in config.field_types().items()}
    for spec in methods.METHODS.values():
        for option, tp in methods.option_types(spec.name).items():
            out[f"method.{spec.name}.{option}"] = tp
    return out


def _samples(action: argparse.Action, tp: object) -> list[list[str]]:
    """Argument lists the flag's help promises to take."""
    flag = action.option_strings[0]
    if action.choices:
        return [[flag, str(action.choices[0])]]
    if isinstance(action, argparse.BooleanOptionalAction):
        return [[flag], [action.option_strings[1]]]
    if "comma-separated" in (action.help or ""):
        item = list_item_type(tp)
        one = "1" if item is int else "q_proj"
        return [[flag, one], [flag, f"{one},{one}"], [flag, f"[{one}]"]]
    if action.metavar == "JSON":
        return [[flag, '{"q_proj": 2}']]
    base = next(a for a in (int, float, str) if a in getattr(tp, "__args__", (tp,)))
    return [[flag, value] for value in SAMPLES[base]]


def test_every_generated_flag_accepts_what_its_help_says():
    parser = build_parser()
    train = parser._subparsers._group_actions[0].choices["train"]
    types = _types()
    checked = 0
    for action in train._actions:
        if action.dest not in types:
            continue
        for argv in _samples(action, types[action.dest]):
            run_config(parser.parse_args(["train", *argv]))
            checked += 1
    assert checked >= len(types)


@pytest.mark.parametrize(
    ("method", "flag", "option"),
    [
        ("lora", "--lora-layers-to-transform", "layers_to_transform"),
        ("qlora", "--qlora-layers-to-transform", "layers_to_transform"),
        ("adapter", "--adapter-layers", "layers"),
    ],
)
@pytest.mark.parametrize(("value", "expected"), [("1", (1,)), ("0,1", (0, 1)), ("[1]", (1,))])
def test_list_valued_flags(method, flag, option, value, expected):
    args = build_parser().parse_args(["train", "--method", method, flag, value])
    assert getattr(build.method(run_config(args)), option) == expected


def test_list_values_in_config_files(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("method: adapter\nadapter:\n  layers: 1\n")
    args = build_parser().parse_args(["train", "--config", str(path)])
    assert build.method(run_config(args)).layers == (1,)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--lr", "nan"], "lr must be finite and > 0, found nan"),
        (["--lr", "inf"], "lr must be finite and > 0, found inf"),
        (["--lr", "0"], "lr must be finite and > 0, found 0.0"),
        (["--lr", "-0.003"], "lr must be finite and > 0, found -0.003"),
        (["--weight-decay", "-5"], "weight_decay must be finite and >= 0, found -5.0"),
        (["--max-grad-norm", "0"], "max_grad_norm must be finite and > 0"),
        (["--num-processes", "2"], "--num-processes 2 --process-id 0 needs --coordinator"),
    ],
)
def test_bad_values_are_refused(argv, message, tmp_path):
    code, _, err = run_main("train", *FAST, "--output-dir", str(tmp_path / "run"), *argv)
    assert code == 2 and message in err, err
    assert not (tmp_path / "run").exists()


def test_non_finite_lr_in_a_config_file(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text("lr = nan\n")
    code, _, err = run_main("train", "--config", str(path))
    assert code == 2 and "lr must be finite" in err, err


@pytest.mark.parametrize(
    ("name", "text", "message"),
    [
        ("run.yaml", "steps: 3\nsteps: 4\n", "line 2: the key 'steps' is given twice"),
        ("run.yaml", "lora:\n  r: 1\n  r: 2\n", "line 3: the key 'r' is given twice"),
        ("run.json", '{"steps": 3, "steps": 4}', "the key 'steps' is given twice"),
        ("run.toml", "steps = 3\nsteps = 4\n", "Cannot overwrite a value"),
    ],
)
def test_duplicate_config_keys_are_refused(tmp_path, name, text, message):
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(ValueError, match=f"{path}: cannot parse: .*{message}"):
        config.load_file(path)
