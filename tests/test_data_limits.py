"""Records that cannot train are refused early, naming the record: one too long for the
sequence (before it is tokenized), one that --truncate would leave without a target, and any
example whose loss mask is all 0 (it would make an all-masked batch)."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
from cli_utils import FAST, run_main
from test_cli_errors import compiles  # noqa: F401  (a fixture)

from jpeft import assets
from jpeft.models.tokenizer import Tokenizer
from jpeft.train import data

SHORT = json.dumps({"prompt": "Sort the digits: 3 1 2", "response": "1 2 3"})


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.from_dir(assets.path("tiny-llama"))


def _no_long_tokenization(monkeypatch, limit: int = 100_000) -> None:
    """Make tokenizing any text longer than ``limit`` characters fail the test."""
    encode = Tokenizer.encode_offsets

    def guarded(self, text, *args, **kwargs):
        assert len(text) <= limit, f"tokenized a text of {len(text):,} characters"
        return encode(self, text, *args, **kwargs)

    monkeypatch.setattr(Tokenizer, "encode_offsets", guarded)


def test_a_too_long_line_is_refused_before_tokenizing(tmp_path, monkeypatch, compiles):  # noqa: F811
    path = tmp_path / "train.jsonl"
    huge = json.dumps({"prompt": "Sort the digits: " + "7 " * 1_000_000, "response": "7"})
    path.write_text("\n".join([SHORT, SHORT, huge, SHORT]) + "\n")
    _no_long_tokenization(monkeypatch)
    code, _, err = run_main(
        "train", *FAST, "--train-data", str(path), "--output-dir", str(tmp_path / "run")
    )
    assert code == 2, err
    assert re.search(rf"{re.escape(str(path))}:3 is 2,000,0\d\d characters long", err), err
    assert "more than the maximum of 64" in err and "(--seq-len)" in err and "(--truncate)" in err
    assert compiles == []


def test_the_length_bound_never_refuses_what_fits(tok):
    for text in ["7 " * 40, "a" * 300, "Sort the digits: 3 1 2 " * 3, "ünï 😀 " * 20, " \n\t" * 50]:
        assert tok.fewest_tokens(text) <= len(tok.encode(text, add_special_tokens=False))


def test_truncate_that_cuts_every_target_is_refused(tmp_path, compiles):  # noqa: F811
    path = tmp_path / "train.jsonl"
    long_prompt = json.dumps({"prompt": "Sort the digits: " + "3 1 2 " * 10, "response": "1"})
    path.write_text("\n".join([SHORT] * 10 + [long_prompt] + [SHORT] * 10) + "\n")
    code, _, err = run_main(
        "train",
        *FAST,
        "--train-data",
        str(path),
        "--eval-data",
        "none",
        "--seq-len",
        "16",
        "--truncate",
        "--output-dir",
        str(tmp_path / "run"),
    )
    assert code == 2, err
    assert f"({path}:11): truncated to 16 tokens it keeps no target token" in err, err
    assert compiles == []


def test_truncate_keeps_records_with_targets_left(tok):
    record = data.Record(prompt="Sort: 3 1", response=" 1 3 " * 10, source="d.jsonl:1")
    (example,) = data.encode_records(tok, [record], max_len=16, truncate=True)
    assert len(example) == 16 and example.loss_mask.any()


def test_an_all_masked_example_is_reported_with_its_record():
    good = data.Example(np.arange(5), np.array([0, 0, 1, 1, 1]), source="d.jsonl:1")
    masked = data.Example(np.arange(5), np.zeros(5), source="d.jsonl:2")
    with pytest.raises(ValueError, match=re.escape("example 1 (d.jsonl:2) has no target token")):
        data.BatchIterator([good, masked], batch_size=1, seq_len=8)
