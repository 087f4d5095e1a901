"""Tokenizer files: --tokenizer DIR for model directories without one, and errors that name
the file (a missing, corrupt or malformed tokenizer.json / tokenizer_config.json)."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest
from cli_utils import FAST, run_main

from jpeft import assets
from jpeft.models.tokenizer import Tokenizer
from jpeft.train.prepare import load_config_and_tokenizer

TINY = Path(assets.path("tiny-llama"))


@pytest.fixture
def bare_model(tmp_path) -> Path:
    """The bundled model without its tokenizer files."""
    out = tmp_path / "model"
    out.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(TINY / name, out / name)
    return out


def test_missing_tokenizer_names_the_fix(bare_model, tmp_path):
    code, _, err = run_main(
        "train", *FAST, "--model", str(bare_model), "--output-dir", str(tmp_path / "run")
    )
    assert code == 2, err
    assert f"no tokenizer.json in {str(bare_model)!r}" in err
    assert "--tokenizer DIR" in err


def test_tokenizer_option_reads_another_directory(bare_model):
    path, _, tok = load_config_and_tokenizer(str(bare_model), str(TINY))
    assert path == str(bare_model) and tok.source == str(TINY)
    assert tok.encode("1 2") == Tokenizer.from_dir(TINY).encode("1 2")
    with pytest.raises(FileNotFoundError, match="tokenizer directory not found: 'nope'"):
        load_config_and_tokenizer(str(bare_model), "nope")
    for command in ("train", "eval", "generate", "export"):
        code, out, _ = run_main(command, "--help")
        assert code == 0 and "--tokenizer" in out, command


def test_sentencepiece_only_directory_says_how_to_convert(bare_model):
    (bare_model / "tokenizer.model").write_bytes(b"\x00")
    with pytest.raises(FileNotFoundError, match=r"has tokenizer.model: write a tokenizer.json"):
        Tokenizer.from_dir(bare_model)


@pytest.mark.parametrize(
    ("name", "content", "what"),
    [
        ("tokenizer.json", "{not json", "not a valid tokenizer.json"),
        ("tokenizer.json", '{"version": "1.0"}', "not a valid tokenizer.json"),
        ("tokenizer_config.json", "{not json", "not valid JSON"),
        ("tokenizer_config.json", "[1, 2]", "expected a JSON object, found list"),
        ("tokenizer_config.json", '{"bos_token": 5}', "bos_token must be a string, found 5"),
        ("tokenizer_config.json", '{"chat_template": 5}', "chat_template must be a string"),
    ],
)
def test_corrupt_tokenizer_files_are_named(tmp_path, name, content, what):
    directory = tmp_path / "tok"
    shutil.copytree(TINY, directory)
    (directory / name).write_text(content)
    with pytest.raises(ValueError, match=re.escape(f"{directory / name}: {what}")):
        Tokenizer.from_dir(directory)
