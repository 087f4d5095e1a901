"""Time to the first training step of ``jpeft train``, with an empty and a warm compilation cache.

    python bench/first_step.py                    # bundled model, LoRA, 2 runs
    python bench/first_step.py -- --method qlora  # arguments after -- go to every run

Runs ``jpeft train`` three times in fresh processes: without the persistent compilation
cache, then twice with a new, empty cache directory (the first run fills it, the second
reads it). The time to the first step is from starting the process to the ``time`` of
the step-1 row of ``metrics.jsonl`` (so it includes loading, the evaluation before
training and every compile on the way). Prints a markdown table and the commands.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time

STEPS = ["--steps", "1", "--eval-samples", "0", "--log-every", "1"]


def first_step_seconds(cache: str, out: str, extra: list[str]) -> tuple[list[str], float, int]:
    """``(command, seconds to the first step, files in the cache after the run)``."""
    command = ["jpeft", "train", *STEPS, "--compilation-cache", cache, *extra]
    argv = [sys.executable, "-m", "jpeft.train.cli", *command[1:], "--output-dir", out]
    started = time.time()
    proc = subprocess.run(argv, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"{shlex.join(command)} failed ({proc.returncode}):\n{proc.stderr}")
    with open(os.path.join(out, "metrics.jsonl"), encoding="utf-8") as f:
        first = next(row for row in map(json.loads, f) if row.get("step") == 1 and "loss" in row)
    files = len(os.listdir(cache)) if os.path.isdir(cache) else 0
    return command, first["time"] - started, files


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("extra", nargs="*", help="arguments for every jpeft train (after --)")
    args = parser.parse_args()
    root = tempfile.mkdtemp(prefix="jpeft-first-step-")
    cache = os.path.join(root, "cache")
    runs = [("no cache", "none"), ("empty cache", cache), ("warm cache", cache)]
    print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs, {platform.python_version()}")
    print("\n| run | time to first step | cache files after |\n|---|---:|---:|")
    commands = []
    for i, (label, directory) in enumerate(runs):
        command, seconds, files = first_step_seconds(directory, f"{root}/run{i}", args.extra)
        commands.append(command)
        print(f"| {label} | {seconds:.1f} s | {files} |")
    print("\ncommands (each with --output-dir <new dir>):")
    for command in commands:
        print("  " + shlex.join(command))


if __name__ == "__main__":
    main()
