"""The bundled corpus, task data and tokenizer: shapes, no leaks, and reproducible scripts."""

import filecmp
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from jpeft.models.tokenizer import Tokenizer
from jpeft.train.data import encode_records, read_documents, read_records

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "assets" / "data"
TOKENIZER_DIR = ROOT / "assets" / "tiny-llama"


def test_task_data_sizes_and_disjoint_split():
    train, held_out = read_records(DATA / "train.jsonl"), read_records(DATA / "eval.jsonl")
    assert (len(train), len(held_out)) == (2000, 200)
    prompts = [r.prompt for r in train + held_out]
    assert len(set(prompts)) == len(prompts)
    for r in train + held_out:
        digits = r.prompt.removeprefix("Sort the digits: ").split()
        assert 3 <= len(digits) <= 5 and r.response.split() == sorted(digits)


def test_corpus_does_not_contain_the_task():
    text = (DATA / "corpus.txt").read_text(encoding="utf-8")
    assert 1_000_000 < len(text) < 3_000_000
    assert "sort the digits" not in text.lower() and "[INST]" not in text
    assert len(read_documents(DATA / "corpus.txt")) > 5000


def test_examples_are_short():
    tok = Tokenizer.from_dir(TOKENIZER_DIR)
    lengths = [len(e) for e in encode_records(tok, read_records(DATA / "train.jsonl"))]
    assert max(lengths) <= 32
    assert 1000 <= tok.vocab_size <= 2048
    targets = encode_records(tok, read_records(DATA / "eval.jsonl"))[0].loss_mask.sum()
    assert 5 <= targets <= 7  # 3-5 digits, the space before </s>, and </s>
    assert np.mean(lengths) > 15


@pytest.mark.parametrize("script", ["make_dataset", "make_tokenizer"])
def test_scripts_reproduce_the_committed_assets(tmp_path, script):
    if script == "make_dataset":
        args, out, expected = ["--out", str(tmp_path)], tmp_path, DATA
        names = ["corpus.txt", "train.jsonl", "eval.jsonl"]
    else:
        args, out, expected = ["--data", str(DATA), "--out", str(tmp_path)], tmp_path, TOKENIZER_DIR
        names = ["tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"]
    subprocess.run(
        [sys.executable, str(ROOT / "scripts" / f"{script}.py"), *args], check=True, cwd=ROOT
    )
    for name in names:
        assert filecmp.cmp(out / name, expected / name, shallow=False), name
