"""bench/compiled_memory.py --smoke: the deviceless-compile benchmark's code runs on CPU."""

from __future__ import annotations

import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "bench"))

import compiled_memory  # noqa: E402


def test_smoke_rows_compile_and_print_the_table(capsys):
    rows = "7B/qlora/paged-adamw,1.1B/prefix"  # paged state; a method initialized on the host
    results = compiled_memory.main(["--smoke", "--rows", rows])
    assert [(r["config"], r["method"], r["optimizer"]) for r in results] == [
        ("1.1B", "prefix", "adamw"),
        ("7B", "qlora", "paged-adamw"),
    ]
    for r in results:
        assert r["peak"] > 0 and r["flops"] > 0 and r["trainable"] > 0
    out = capsys.readouterr().out
    assert "| 7B | qlora | paged-adamw |" in out
    assert "python " in out and "--smoke" in out  # the command that produced the table
