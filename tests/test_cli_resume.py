"""Ctrl-C checkpoints, ``--resume`` continues exactly, a NaN loss stops with a checkpoint."""

from __future__ import annotations

import os
import signal

from cli_utils import (
    FAST,
    assert_same_adapter,
    finish,
    reference_run,
    run_main,
    start_cli,
    train_losses,
)


def test_sigint_saves_and_resume_matches_an_uninterrupted_run(tmp_path):
    _, reference = reference_run()
    out = tmp_path / "interrupted"
    proc = start_cli("train", *FAST, "--eval-samples", "0", "--output-dir", str(out))
    for line in proc.stdout:  # Ctrl-C is handled from before the first evaluation on
        if line.startswith("before training:"):
            break
    proc.send_signal(signal.SIGINT)  # lands while step 1 compiles: stop after step 1
    code, stdout, stderr = finish(proc)
    assert code == 130, stderr
    (saved,) = os.listdir(out / "checkpoints")
    assert int(saved) in (1, 2), "stopped at the first step boundary after Ctrl-C"
    assert f"interrupted at step {saved};" in stdout
    assert f"jpeft train --resume {out}" in stdout

    code, stdout, stderr = run_main("train", "--resume", str(out))
    assert code == 0, stderr
    assert f"resumed {out} at step {saved}" in stdout and "after training" in stdout
    assert sorted(os.listdir(out / "checkpoints")) == [saved, "3"]
    assert_same_adapter(out, reference)
    assert train_losses(out) == train_losses(reference)


def test_nan_loss_stops_after_saving_the_last_good_checkpoint(tmp_path):
    out = tmp_path / "run"
    args = [*FAST, "--lr", "1e30", "--eval-samples", "0", "--output-dir", str(out)]
    code, stdout, _ = run_main("train", *args)
    assert code == 1
    line = next(line for line in stdout.splitlines() if line.startswith("stopped:"))
    bad = int(line.split(" at step ")[1].split(";")[0])
    assert "the loss is nan" in line or "the loss is inf" in line
    assert f"saved the last good checkpoint (step {bad - 1})" in line
    assert os.listdir(out / "checkpoints") == [str(bad - 1)]
