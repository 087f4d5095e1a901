"""JSONL records: validation, and errors that name the file and the 1-based line."""

import json
import re

import pytest

from jpeft.train.data import Record, read_records, split_eval


def _write(tmp_path, lines):
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


GOOD = json.dumps({"prompt": "p", "response": "r"})


def test_reads_both_forms_and_skips_blank_lines(tmp_path):
    chat = {"messages": [{"role": "user", "content": "u"}, {"role": "assistant", "content": "a"}]}
    path = _write(tmp_path, [GOOD, "", json.dumps({**chat, "id": 7})])
    records = read_records(path)
    assert [r.is_chat for r in records] == [False, True]
    assert records[1].source == f"{path}:3"
    assert records[1].messages[1]["content"] == "a"


@pytest.mark.parametrize(
    ("bad", "what"),
    [
        ('{"prompt": "p", "response": ', "invalid JSON"),
        ("[1, 2]", "expected a JSON object, found list"),
        ('{"prompt": "p"}', "missing 'response'"),
        ('{"prompt": "p", "response": 3}', "'response' must be a string, found int"),
        ('{"messages": "hi"}', "'messages' must be a list, found str"),
        ('{"messages": []}', "'messages' is empty"),
        ('{"messages": [{"role": "bot", "content": "x"}]}', "role must be one of"),
        ('{"messages": [{"role": "user", "content": null}]}', "content must be a string"),
        ('{"messages": [{"role": "user", "content": "x"}]}', "no assistant message"),
        ('{"prompt": "p", "response": "r", "messages": []}', "not both"),
    ],
)
def test_malformed_line_names_file_and_line(tmp_path, bad, what):
    path = _write(tmp_path, [GOOD, "", GOOD, bad, GOOD])
    with pytest.raises(ValueError, match=re.escape(f"{path}:4: ") + ".*" + re.escape(what)):
        read_records(path)


def test_empty_file_is_an_error(tmp_path):
    path = tmp_path / "empty.jsonl"
    path.write_text("\n", encoding="utf-8")
    with pytest.raises(ValueError, match="no records"):
        read_records(path)


def test_eval_split_is_deterministic_and_disjoint():
    records = [Record(prompt=f"q{i % 150}", response="a", source=str(i)) for i in range(200)]
    train, held_out = split_eval(records, fraction=0.1, seed=3)
    assert (train, held_out) == split_eval(records, fraction=0.1, seed=3)
    assert split_eval(records, fraction=0.1, seed=4)[1] != held_out
    assert len(train) + len(held_out) == len(records)
    assert 15 <= len(held_out) <= 25
    # duplicates (q0..q49 appear twice) never straddle the split
    assert not {r.key() for r in train} & {r.key() for r in held_out}


def test_eval_split_rejects_bad_fraction():
    with pytest.raises(ValueError, match="fraction"):
        split_eval([Record(prompt="a", response="b")] * 3, fraction=1.5)
