"""The data formats people have (alpaca, ShareGPT, HF messages, prompt/response, text) in
JSONL, JSON arrays and Parquet: detected per record, forced with --data-format, tokenized as
transformers' apply_chat_template tokenizes the same conversation, bad records named."""

from __future__ import annotations

import dataclasses
import json
import re
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import transformers

from jpeft import assets
from jpeft.models.tokenizer import Tokenizer
from jpeft.train import data, prepare
from jpeft.train.cli import build_parser
from jpeft.train.config import RunConfig

README = Path(__file__).resolve().parents[1] / "README.md"
SYSTEM, USER, ANSWER = "Answer briefly.", "Sort the digits: 3 1 2", "1 2 3"
ROWS = {
    "prompt-response": {"prompt": USER, "response": ANSWER},
    "alpaca": {"instruction": "Sort the digits.", "input": "3 1 2", "output": ANSWER},
    "sharegpt": {
        "conversations": [
            {"from": "system", "value": SYSTEM},
            {"from": "human", "value": USER},
            {"from": "gpt", "value": ANSWER},
        ]
    },
    "messages": {
        "messages": [
            {"role": "system", "content": SYSTEM},
            {"role": "user", "content": USER},
            {"role": "assistant", "content": ANSWER},
        ]
    },
}
# The conversation each record above stands for.
CHATS = {
    "prompt-response": [
        {"role": "user", "content": USER},
        {"role": "assistant", "content": ANSWER},
    ],
    "alpaca": [
        {"role": "user", "content": "Sort the digits.\n\n3 1 2"},
        {"role": "assistant", "content": ANSWER},
    ],
    "sharegpt": ROWS["messages"]["messages"],
    "messages": ROWS["messages"]["messages"],
}


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.from_dir(assets.path("tiny-llama"))


@pytest.fixture(scope="module")
def hf():
    return transformers.AutoTokenizer.from_pretrained(assets.path("tiny-llama"))


def write(path: Path, rows: list) -> Path:
    """``rows`` as JSONL, a JSON array or Parquet, chosen by the suffix of ``path``."""
    if path.suffix == ".parquet":
        pq.write_table(pa.Table.from_pylist(rows), path)
    elif path.suffix == ".json":
        path.write_text(json.dumps(rows))
    else:
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.mark.parametrize("fmt", list(ROWS))
def test_each_format_tokenizes_as_transformers_chat(tmp_path, tok, hf, fmt):
    path = write(tmp_path / "d.jsonl", [ROWS[fmt], {"id": 1, **ROWS[fmt]}])
    records = data.read_records(path)
    assert records[0] == dataclasses.replace(records[1], source=f"{path}:1")
    example = data.encode_record(tok, records[0])
    assert example.input_ids.tolist() == hf.apply_chat_template(CHATS[fmt])["input_ids"]
    targets = tok.decode(example.input_ids[example.loss_mask == 1], skip_special=False)
    assert targets == f" {ANSWER} </s>"
    assert data.read_records(path, format=fmt) == records


@pytest.mark.parametrize("suffix", [".json", ".parquet"])
def test_json_arrays_and_parquet_hold_the_same_records(tmp_path, suffix):
    rows = [ROWS["messages"], ROWS["messages"], ROWS["messages"]]
    jsonl = data.read_records(write(tmp_path / "d.jsonl", rows))
    path = write(tmp_path / f"d{suffix}", rows)
    records = data.read_records(path)
    assert [r.key() for r in records] == [r.key() for r in jsonl]
    where = f"{path}[2]" if suffix == ".json" else f"{path} row 2"
    assert records[2].source == where


@pytest.mark.parametrize("value", ["", None, "missing"])
def test_alpaca_without_input_is_the_instruction(tmp_path, value):
    row = {
        "instruction": "Say hi.",
        "output": "hi",
        **({} if value == "missing" else {"input": value}),
    }
    record = data.read_records(write(tmp_path / "a.jsonl", [row]))[0]
    assert (record.prompt, record.response) == ("Say hi.", "hi")


def test_alpaca_text_column_is_still_alpaca(tmp_path):
    row = {**ROWS["alpaca"], "text": "Below is an instruction ..."}
    assert data.read_records(write(tmp_path / "a.jsonl", [row]))[0].kind == "prompt-response"


BAD = [
    ('{"prompt": "p"}', "missing 'response'"),
    ('{"instruction": "i", "input": "x"}', "missing 'output'"),
    ('{"instruction": "i", "output": 3}', "'output' must be a string, found int"),
    ('{"conversations": [{"from": "bot", "value": "x"}]}', "'from' must be one of"),
    ('{"conversations": [{"from": "human", "value": 1}]}', "'value' must be a string"),
    ('{"conversations": [{"from": "human", "value": "x"}]}', "no assistant message"),
    ('{"conversations": "hi"}', "'conversations' must be a list, found str"),
    ('{"messages": [{"role": "bot", "content": "x"}]}', "role must be one of"),
    ('{"text": 5}', "'text' must be a string, found int"),
    ('{"question": "q", "answer": "a"}', "no known record keys"),
    ('{"instruction": "i", "output": "o", "messages": []}', "not both"),
]


@pytest.mark.parametrize(("bad", "what"), BAD)
def test_bad_record_names_file_line_and_problem(tmp_path, bad, what):
    path = tmp_path / "d.jsonl"
    good = json.dumps(ROWS["alpaca"])
    path.write_text("\n".join([good, good, bad, good]) + "\n")
    with pytest.raises(ValueError, match=re.escape(f"{path}:3: ") + ".*" + re.escape(what)):
        data.read_records(path)


@pytest.mark.parametrize("suffix", [".json", ".parquet"])
def test_bad_record_names_index_or_row(tmp_path, suffix):
    rows = [ROWS["prompt-response"], {"prompt": "p", "response": None}]
    path = write(tmp_path / f"d{suffix}", rows)
    where = f"{path}[1]" if suffix == ".json" else f"{path} row 1"
    with pytest.raises(ValueError, match=re.escape(f"{where}: 'response' must be a string")):
        data.read_records(path)


def test_forced_format_names_what_is_missing(tmp_path):
    path = write(tmp_path / "d.jsonl", [ROWS["prompt-response"]])
    with pytest.raises(ValueError, match=re.escape(f"{path}:1: missing 'instruction'")):
        data.read_records(path, format="alpaca")
    with pytest.raises(ValueError, match="unknown data format 'csv'"):
        data.read_records(path, format="csv")


def test_bad_files_are_named(tmp_path):
    array = tmp_path / "d.json"
    array.write_text('{"prompt": "p", "response": "r"}')
    with pytest.raises(ValueError, match=re.escape(f"{array}: expected a JSON array")):
        data.read_records(array)
    broken = tmp_path / "e.parquet"
    broken.write_bytes(b"not parquet")
    with pytest.raises(ValueError, match=re.escape(f"{broken}: not a valid Parquet file")):
        data.read_records(broken)


def test_parquet_without_pyarrow_says_how_to_install(tmp_path, monkeypatch):
    path = write(tmp_path / "d.parquet", [ROWS["prompt-response"]])
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    with pytest.raises(ValueError, match=r"needs pyarrow.*pip install 'jpeft\[parquet\]'"):
        data.read_records(path)


def test_text_records_train_every_token_as_the_corpus(tmp_path, tok):
    docs = [("Once upon a time, there was a cat. " * 6).strip(), "1 + 1 = 2"]
    records = data.read_records(write(tmp_path / "t.jsonl", [{"text": d} for d in docs]))
    examples = data.encode_records(tok, records, max_len=16)
    assert all(e.loss_mask[0] == 0 and e.loss_mask[1:].all() for e in examples)
    corpus = tmp_path / "t.txt"
    corpus.write_text("\n\n".join(docs))
    pieces = data.encode_records(tok, data.read_data(corpus), max_len=16)
    assert [e.input_ids.tolist() for e in pieces] == [e.input_ids.tolist() for e in examples]
    targets = np.concatenate([e.input_ids[1:] for e in examples]).tolist()
    full = [[*tok.encode(d), tok.eos_id] for d in docs]
    assert targets == full[0][1:] + full[1][1:]
    assert examples[0].source == f"{tmp_path / 't.jsonl'}:1 token 0"
    with pytest.raises(ValueError, match="cannot be mixed"):
        data.encode_records(tok, [*records, data.Record(prompt="a", response="b")], max_len=16)


@pytest.mark.parametrize("fmt", ["alpaca", "sharegpt", "text"])
def test_run_reads_each_format(tmp_path, tok, fmt):
    _, cfg, _ = prepare.load_config_and_tokenizer("assets/tiny-llama")
    if fmt == "text":
        rows = [{"text": f"Story {i}: once upon a time, {i} cats."} for i in range(20)]
    else:
        rows = [{**ROWS[fmt], "id": i} for i in range(20)]
        rows = [json.loads(json.dumps(r).replace("3 1 2", f"{i} 1 2")) for i, r in enumerate(rows)]
    path = write(tmp_path / "d.json", rows)
    run = RunConfig(train_data=str(path), eval_data=None, data_format=fmt, seq_len=64)
    dataset = prepare.load_data(run, tok, cfg)
    assert dataset.train and dataset.eval
    assert (dataset.eval_records == []) == (fmt == "text")


def test_plain_text_file_refuses_a_record_format(tmp_path):
    corpus = tmp_path / "c.txt"
    corpus.write_text("one\n\ntwo\n")
    with pytest.raises(ValueError, match="plain-text file holds text documents, not alpaca"):
        data.read_data(corpus, format="alpaca")


def test_keys_are_documented_in_help_and_readme():
    train = build_parser()._subparsers._group_actions[0].choices["train"]
    help_text = train.format_help()
    readme = README.read_text()
    assert "--data-format" in help_text and "--tokenizer" in help_text
    for line in data.HELP.splitlines():
        if line.startswith("  "):
            assert line in help_text, line
            assert line.strip() in readme, line
