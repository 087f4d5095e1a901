"""Resume is exact or refused; corrupt checkpoints and full disks are reported, not hidden."""

from __future__ import annotations

import errno
import json
import os
import shutil
import struct

import jax.numpy as jnp
import numpy as np
import orbax.checkpoint._src.handlers.json_checkpoint_handler as orbax_json
import pytest
from cli_utils import FAST, assert_same_adapter, reference_run, run_main, train_losses
from test_checkpoint import lora_params, new_state
from test_cli_errors import compiles  # noqa: F401 (fixture)

import jpeft
from jpeft.train.checkpoint import Checkpointer, CorruptCheckpoint, DiskFull
from jpeft.train.config import RunConfig
from jpeft.train.resume import check_options


def copy_of_reference(tmp_path):
    out = tmp_path / "run"
    shutil.copytree(reference_run()[1], out)
    return out


def rows(run_dir) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_resume_refuses_options_that_change_the_trajectory(tmp_path, compiles):  # noqa: F811
    out = copy_of_reference(tmp_path)
    compiles.clear()
    args = ("--lora-alpha", "32", "--batch-size", "4", "--seed", "1", "--log-every", "5")
    code, _, err = run_main("train", "--resume", str(out), *args)
    assert code == 2, err
    for line in ("--lora-alpha: 16.0 in the run, 32.0 now", "--batch-size: 8 in the run, 4 now",
                 "--seed: 0 in the run, 1 now"):  # fmt: skip
        assert line in err, err
    assert "--log-every" not in err
    assert f"jpeft train --config {out}/run.yaml --output-dir NEW_DIR --batch-size 4" in err
    code, _, err = run_main("train", "--resume", str(out), "--steps", "2")
    assert code == 2 and "the checkpoint is at step 3, past --steps 2" in err, err
    assert compiles == []


def test_resume_allows_options_that_keep_the_trajectory():
    run = RunConfig(lr=0.01)
    same = RunConfig(lr=0.01, log_every=1, eval_every=7, save_every=2, keep_checkpoints=1,
                     eval_samples=0, mesh="data=1", remat="full", output_dir="x")  # fmt: skip
    assert check_options(run, same, "runs/x") == []
    constant = RunConfig(schedule="constant", warmup_steps=2)
    longer = RunConfig(schedule="constant", warmup_steps=2, steps=900)
    assert check_options(constant, longer, "x") == []
    with pytest.raises(ValueError, match="--steps: 300 in the run, 900 now"):
        check_options(RunConfig(), RunConfig(steps=900), "x")
    with pytest.raises(
        ValueError, match=r"--eval-data: 'assets/data/eval\.jsonl' in the run, None"
    ):
        check_options(RunConfig(), RunConfig(eval_data=None), "x")  # splits the training data


def test_one_metrics_row_per_step_after_a_crash(tmp_path):
    """What kill -9 after step 3 of a run saving every step leaves: rows past the newest
    complete checkpoint (2), a half-written row, and a partial checkpoint directory."""
    _, reference = reference_run()
    out = tmp_path / "run"
    code, _, err = run_main("train", *FAST, "--save-every", "1", "--output-dir", str(out))
    assert code == 0, err
    for name in ("adapter", "checkpoints/3"):
        shutil.rmtree(out / name)
    os.remove(out / "summary.json")
    shutil.copytree(out / "checkpoints" / "2", out / "checkpoints" / "3.orbax-checkpoint-tmp")
    with open(out / "metrics.jsonl", "a") as f:
        f.write('{"step": 4, "lo')

    code, stdout, err = run_main("train", "--resume", str(out))
    assert code == 0, err
    assert f"resumed {out} at step 2" in stdout
    assert sorted(os.listdir(out / "checkpoints")) == ["1", "2", "3"]
    steps = [(r["step"], "loss" in r) for r in rows(out)]
    assert steps == [(0, False), (1, True), (2, True), (3, True), (3, False)]
    assert train_losses(out) == train_losses(reference)
    assert_same_adapter(out, reference)


def test_deferred_metrics_give_the_same_run(tmp_path):
    """Metrics read every 3 steps (not after each step), batches prefetched: same run."""
    _, reference = reference_run()
    out = tmp_path / "run"
    code, _, err = run_main("train", *FAST, "--log-every", "3", "--output-dir", str(out))
    assert code == 0, err
    assert_same_adapter(out, reference)
    expected = np.mean(list(train_losses(reference).values()))
    assert train_losses(out) == {3: pytest.approx(expected, rel=1e-12)}


def flip_bytes(step_dir) -> str:
    """Flip 8 bytes in the middle of the largest array file of a checkpoint."""
    files = [os.path.join(r, f) for r, _, fs in os.walk(step_dir / "arrays") for f in fs]
    path = max(files, key=os.path.getsize)
    with open(path, "r+b") as f:
        f.seek(os.path.getsize(path) // 2)
        chunk = f.read(8)
        f.seek(-8, os.SEEK_CUR)
        f.write(bytes(b ^ 0xFF for b in chunk))
    return path


def test_a_corrupt_checkpoint_is_named_and_skipped_only_when_asked(tmp_path):
    state = new_state(jpeft.split(lora_params())[0])
    with Checkpointer(tmp_path) as ckpt:
        for step in (1, 2):
            ckpt.save(state.replace(step=jnp.int32(step)), data={"at": step})
    flip_bytes(tmp_path / "2")
    with Checkpointer(tmp_path) as ckpt, pytest.raises(CorruptCheckpoint, match=f"{tmp_path}/2"):
        ckpt.restore(state)
    with Checkpointer(tmp_path) as ckpt:
        restored, data = ckpt.restore(state, fall_back=True)
        assert int(restored.step) == 1 and data == {"at": 1}
        assert ckpt.all_steps() == [1]
    assert sorted(os.listdir(tmp_path)) == ["1", "2.corrupt"]


def messages(stderr: str) -> list[str]:
    """The lines of ``stderr`` other than the progress bar's."""
    lines = [line.split("\r")[-1] for line in stderr.splitlines()]
    return [line for line in lines if line.strip() and not line.startswith("train:")]


def no_space(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


def test_a_full_disk_while_checkpointing_leaves_no_partial_directory(tmp_path, monkeypatch):
    state = new_state(jpeft.split(lora_params())[0])
    monkeypatch.setattr(orbax_json.JsonCheckpointHandler, "_save_fn", no_space)
    with Checkpointer(tmp_path) as ckpt, pytest.raises(DiskFull, match="checkpoint 0 in"):
        ckpt.save(state)
    assert os.listdir(tmp_path) == []


def test_a_full_disk_is_one_clear_line(tmp_path, monkeypatch):
    out = tmp_path / "run"
    monkeypatch.setattr(orbax_json.JsonCheckpointHandler, "_save_fn", no_space)
    code, _, err = run_main("train", *FAST, "--eval-samples", "0", "--output-dir", str(out))
    assert code == 3, err
    assert messages(err) == [
        f"jpeft train: error: no space left on the device while writing checkpoint 3 in "
        f"{out}/checkpoints (its partial directory was removed); free space, then continue: "
        f"jpeft train --resume {out}"
    ]
    assert os.listdir(out / "checkpoints") == []


def test_a_full_disk_while_writing_the_adapter(tmp_path, monkeypatch):
    out = tmp_path / "run"
    monkeypatch.setattr(jpeft, "save_hf_adapter", no_space)
    code, _, err = run_main("train", *FAST, "--eval-samples", "0", "--output-dir", str(out))
    assert code == 3, err
    (line,) = messages(err)
    assert line.startswith("jpeft train: error: no space left on the device while writing")
    assert line.endswith(f"jpeft train --resume {out}")


def tensorboard_scalars(run_dir) -> dict[str, list[tuple[int, float]]]:
    """``{tag: [(step, value)]}`` from the TFRecord event files of a run directory."""
    from tensorboardX.proto.event_pb2 import Event

    out: dict[str, list[tuple[int, float]]] = {}
    for name in sorted(os.listdir(run_dir)):
        if not name.startswith("events.out.tfevents."):
            continue
        data = (run_dir / name).read_bytes()
        pos = 0
        while pos < len(data):
            (length,) = struct.unpack("<Q", data[pos : pos + 8])
            event = Event.FromString(data[pos + 12 : pos + 12 + length])
            pos += 12 + length + 4
            for value in event.summary.value:
                out.setdefault(value.tag, []).append((event.step, value.simple_value))
    return out


def test_tensorboard_events_hold_the_training_and_eval_scalars():
    _, reference = reference_run()
    scalars = tensorboard_scalars(reference)
    losses = train_losses(reference)
    assert [step for step, _ in scalars["train/loss"]] == [1, 2, 3]
    assert [v for _, v in scalars["train/loss"]] == pytest.approx(list(losses.values()))
    for tag in ("train/learning_rate", "train/grad_norm", "train/tokens_per_second"):
        assert [step for step, _ in scalars[tag]] == [1, 2, 3], tag
    assert [step for step, _ in scalars["eval/loss"]] == [0, 3]
    assert [step for step, _ in scalars["eval/accuracy"]] == [0, 3]


# The reference run's losses before the loop was rewritten (metrics read every step,
# batches built in the loop, the learning rate from TrainState.lr_schedule).
LOSSES_BEFORE = {1: 8.327230453491211, 2: 6.687506198883057, 3: 5.44581413269043}


def test_the_rewritten_loop_trains_as_before():
    _, reference = reference_run()
    assert train_losses(reference) == pytest.approx(LOSSES_BEFORE, rel=1e-6)
