"""Helpers shared by the command-line tests: fast flags, runs in-process and in subprocesses."""

from __future__ import annotations

import atexit
import contextlib
import functools
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file

from jpeft.train.cli import main

REPO = Path(__file__).resolve().parents[1]

# A few tiny steps on the bundled model and task; accuracy on 4 held-out prompts.
FAST = [
    "--steps", "3", "--batch-size", "8", "--eval-batch-size", "8", "--eval-samples", "4",
    "--eval-every", "0", "--log-every", "1", "--warmup-steps", "1",
]  # fmt: skip


@functools.cache
def reference_run() -> tuple[str, Path]:
    """``(stdout, run dir)`` of ``jpeft train`` with :data:`FAST`, run once in this process.

    The resumed, sharded and multi-process runs of the tests must equal it.
    """
    root = tempfile.mkdtemp(prefix="jpeft-cli-test-")
    atexit.register(shutil.rmtree, root, ignore_errors=True)
    out = Path(root) / "run"
    code, stdout, stderr = run_main("train", *FAST, "--output-dir", str(out))
    assert code == 0, stderr
    return stdout, out


def run_main(*args: str) -> tuple[int, str, str]:
    """``(exit status, stdout, stderr)`` of ``jpeft <args>`` run in this process."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(list(args))
        except SystemExit as e:
            code = int(e.code or 0)
    return code, out.getvalue(), err.getvalue()


def cli_env(devices: int = 1) -> dict[str, str]:
    """Environment of a ``jpeft`` subprocess: CPU with ``devices`` devices."""
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1")
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    return env


def start_cli(*args: str, devices: int = 1) -> subprocess.Popen:
    """Start ``python -m jpeft.train.cli <args>`` in the repository (stdout and stderr piped)."""
    return subprocess.Popen(
        [sys.executable, "-m", "jpeft.train.cli", *args],
        cwd=REPO,
        env=cli_env(devices),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def finish(proc: subprocess.Popen, timeout: float = 240) -> tuple[int, str, str]:
    """Wait for a started command; ``(exit status, stdout, stderr)``."""
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, out, err


def adapter_tensors(run_dir: str | Path) -> dict[str, np.ndarray]:
    """The tensors of a run's saved peft adapter."""
    return load_file(os.path.join(run_dir, "adapter", "adapter_model.safetensors"))


def train_losses(run_dir: str | Path) -> dict[int, float]:
    """``{step: loss}`` from a run's metrics log."""
    with open(os.path.join(run_dir, "metrics.jsonl"), encoding="utf-8") as f:
        rows = [json.loads(line) for line in f]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def assert_same_adapter(a: str | Path, b: str | Path, rtol: float = 0.0, atol: float = 0.0):
    """Two runs saved the same adapter tensors (exactly, by default)."""
    ta, tb = adapter_tensors(a), adapter_tensors(b)
    assert sorted(ta) == sorted(tb)
    for key in ta:
        np.testing.assert_allclose(ta[key], tb[key], rtol=rtol, atol=atol, err_msg=key)
