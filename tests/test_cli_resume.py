"""Ctrl-C and SIGTERM checkpoint, ``--resume`` continues exactly, a NaN loss stops with a
checkpoint whose own loss is finite."""

from __future__ import annotations

import math
import os
import signal

import pytest
from cli_utils import (
    FAST,
    assert_same_adapter,
    finish,
    reference_run,
    run_main,
    start_cli,
    train_losses,
)


@pytest.mark.parametrize(
    ("signum", "code", "status"),
    [(signal.SIGINT, 130, "interrupted"), (signal.SIGTERM, 143, "terminated")],
)
def test_a_signal_saves_and_resume_matches_an_uninterrupted_run(tmp_path, signum, code, status):
    _, reference = reference_run()
    out = tmp_path / "interrupted"
    proc = start_cli("train", *FAST, "--eval-samples", "0", "--output-dir", str(out))
    for line in proc.stdout:  # signals are handled from before the first evaluation on
        if line.startswith("before training:"):
            break
    proc.send_signal(signum)  # lands while step 1 compiles: stop after step 1
    returned, stdout, stderr = finish(proc)
    assert returned == code, stderr
    (saved,) = os.listdir(out / "checkpoints")
    assert int(saved) in (1, 2), "stopped at the first step boundary after the signal"
    assert f"{status} at step {saved};" in stdout
    assert f"jpeft train --resume {out}" in stdout

    code, stdout, stderr = run_main("train", "--resume", str(out))
    assert code == 0, stderr
    assert f"resumed {out} at step {saved}" in stdout and "after training" in stdout
    assert sorted(os.listdir(out / "checkpoints")) == [saved, "3"]
    assert_same_adapter(out, reference)
    assert train_losses(out) == train_losses(reference)


def test_nan_loss_saves_a_state_whose_own_loss_is_finite_and_resumes(tmp_path):
    """The loss of step k is that of the params after update k-1: when it is NaN, those
    params are bad, and the saved state is the one before them."""
    out = tmp_path / "run"
    args = [*FAST, "--lr", "1e30", "--eval-samples", "0", "--output-dir", str(out)]
    code, stdout, _ = run_main("train", *args)
    assert code == 1
    line = next(line for line in stdout.splitlines() if line.startswith("stopped:"))
    bad = int(line.split(" at step ")[1].split(";")[0])
    assert "the loss is nan" in line or "the loss is inf" in line
    assert f"saved the last good checkpoint (step {bad - 2})" in line
    assert os.listdir(out / "checkpoints") == [str(bad - 2)]

    code, stdout, err = run_main("eval", "--run", str(out), "--eval-samples", "0")
    assert code == 0, err
    loss = float(stdout.split("eval loss ")[1].split()[0])
    assert math.isfinite(loss)

    code, stdout, err = run_main("train", "--resume", str(out), "--lr", "3e-3")
    assert code == 0, err
    assert "with --lr 0.003 (was 1e+30)" in stdout and "after training" in stdout
    assert sorted(train_losses(out)) == [1, 2, 3]
    assert all(math.isfinite(v) for v in train_losses(out).values())
