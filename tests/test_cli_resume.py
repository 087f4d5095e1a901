"""Ctrl-C checkpoints, ``--resume`` continues exactly, a NaN loss stops with a checkpoint."""

from __future__ import annotations

import os
import signal
import time

from cli_utils import FAST, assert_same_adapter, finish, run_main, start_cli, train_losses

LONG = [*FAST, "--steps", "60", "--save-every", "0", "--eval-samples", "0"]


def test_sigint_saves_and_resume_matches_an_uninterrupted_run(tmp_path):
    interrupted, straight = tmp_path / "interrupted", tmp_path / "straight"
    proc = start_cli("train", *LONG, "--output-dir", str(interrupted))
    metrics = interrupted / "metrics.jsonl"
    deadline = time.monotonic() + 180
    while not (metrics.exists() and '"loss"' in metrics.read_text()):
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "training never started"
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    code, stdout, stderr = finish(proc)
    assert code == 130, stderr
    assert "interrupted at step" in stdout and "--resume" in stdout
    (saved,) = os.listdir(interrupted / "checkpoints")
    assert 1 <= int(saved) < 60

    code, stdout, stderr = run_main("train", "--resume", str(interrupted))
    assert code == 0, stderr
    assert f"resumed {interrupted} at step {saved}" in stdout
    code, _, stderr = run_main("train", *LONG, "--output-dir", str(straight))
    assert code == 0, stderr
    assert_same_adapter(interrupted, straight)
    assert train_losses(interrupted) == train_losses(straight)


def test_nan_loss_stops_after_saving_the_last_good_checkpoint(tmp_path):
    out = tmp_path / "run"
    code, stdout, _ = run_main("train", *FAST, "--lr", "1e30", "--output-dir", str(out))
    assert code == 1
    line = next(line for line in stdout.splitlines() if line.startswith("stopped:"))
    bad = int(line.split(" at step ")[1].split(";")[0])
    assert "the loss is nan" in line or "the loss is inf" in line
    assert f"saved the last good checkpoint (step {bad - 1})" in line
    assert os.listdir(out / "checkpoints") == [str(bad - 1)]
