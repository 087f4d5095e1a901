"""Nothing a user trained is overwritten, and no symbolic link in a run directory is followed."""

from __future__ import annotations

import os
import shutil

import pytest
from cli_utils import FAST, reference_run, run_main
from test_cli_errors import compiles  # noqa: F401 (fixture)

from jpeft.train import run_dir
from jpeft.train.metrics_log import MetricsLog

MODEL = "assets/tiny-llama"


def copy_of_reference(tmp_path):
    out = tmp_path / "run"
    shutil.copytree(reference_run()[1], out, symlinks=True)
    return out


def snapshot(path):
    return {
        os.path.relpath(os.path.join(r, f), path): os.path.getmtime(os.path.join(r, f))
        for r, _, fs in os.walk(path)
        for f in fs
    }


def test_a_new_run_refuses_a_finished_run_directory(tmp_path, compiles):  # noqa: F811
    out = copy_of_reference(tmp_path)
    before = snapshot(out)
    compiles.clear()  # the reference run compiled
    code, _, err = run_main("train", *FAST, "--output-dir", str(out))
    assert code == 2, err
    assert "already holds a run (run.yaml, metrics.jsonl, summary.json, checkpoints" in err
    assert f"--resume {out}" in err and "--overwrite" in err
    assert compiles == [] and snapshot(out) == before


def test_a_new_run_refuses_a_non_empty_directory(tmp_path, compiles):  # noqa: F811
    (tmp_path / "notes.txt").write_text("mine")
    code, _, err = run_main("train", *FAST, "--output-dir", str(tmp_path))
    assert code == 2 and "is not empty" in err, err
    assert compiles == [] and os.listdir(tmp_path) == ["notes.txt"]


def test_overwrite_removes_only_the_previous_run(tmp_path):
    out = copy_of_reference(tmp_path)
    (out / "notes.txt").write_text("mine")
    run_dir.check(str(out), resume=False, overwrite=True)
    run_dir.start(str(out), resume=False)
    assert os.listdir(out) == ["notes.txt"]
    with pytest.raises(ValueError, match="--resume or --overwrite, not both"):
        run_dir.check(str(out), resume=True, overwrite=True)


def test_export_refuses_its_own_model_directory_and_non_empty_ones(tmp_path, compiles):  # noqa: F811
    merged = ("export", "--merged", "--model", MODEL)
    code, _, err = run_main(*merged, "--out", MODEL, "--overwrite")
    assert code == 2 and "is the directory the export reads from" in err, err
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "config.json").write_text("{}")
    code, _, err = run_main(*merged, "--out", str(tmp_path / "full"))
    assert code == 2 and "is not empty" in err and "--overwrite" in err, err
    (tmp_path / "file").write_text("x")
    code, _, err = run_main(*merged, "--out", str(tmp_path / "file"))
    assert code == 2 and "is an existing file" in err, err
    assert compiles == []


@pytest.mark.parametrize("name", ["run.yaml", "metrics.jsonl", "summary.json", "checkpoints/3"])
def test_links_in_a_run_directory_are_refused(tmp_path, name):
    out = copy_of_reference(tmp_path)
    outside = tmp_path / "outside"
    shutil.copytree(out, outside)
    target = outside / name
    before = snapshot(outside)
    link = out / name
    shutil.rmtree(link) if link.is_dir() else link.unlink()
    link.symlink_to(target)
    code, _, err = run_main("train", "--resume", str(out), "--keep-checkpoints", "1")
    assert code == 2, err
    assert f"{link} is a symbolic link" in err and "remove the link" in err
    assert snapshot(outside) == before


def test_metrics_are_never_appended_through_a_link(tmp_path):
    (tmp_path / "elsewhere.jsonl").write_text("")
    (tmp_path / "metrics.jsonl").symlink_to(tmp_path / "elsewhere.jsonl")
    with pytest.raises(OSError):
        MetricsLog(tmp_path / "metrics.jsonl")
    assert (tmp_path / "elsewhere.jsonl").read_text() == ""
