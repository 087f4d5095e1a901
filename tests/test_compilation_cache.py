"""The CLI keeps compiled programs in JAX's persistent cache: a second start compiles nothing."""

from __future__ import annotations

import os

from cli_utils import FAST, finish, start_cli

from jpeft.train.cli import CACHE_ENV, build_parser, default_cache_dir


def test_a_second_run_reads_every_program_from_the_cache(tmp_path):
    cache = tmp_path / "cache"
    counts = []
    for i in range(2):
        out = tmp_path / f"run{i}"
        args = ("--eval-samples", "0", "--compilation-cache", str(cache), "--output-dir", str(out))
        code, _, err = finish(start_cli("train", *FAST, *args))
        assert code == 0, err
        counts.append(len(os.listdir(cache)))
    assert counts[0] > 0 and counts[1] == counts[0], counts


def test_the_cache_is_on_by_default_and_can_be_turned_off(monkeypatch):
    monkeypatch.delenv(CACHE_ENV, raising=False)
    assert build_parser().parse_args(["train"]).compilation_cache == default_cache_dir()
    assert build_parser().parse_args(["eval", "--no-compilation-cache"]).compilation_cache == "none"
