"""Every PEFT method on the bundled task: trainable params, accuracy, step time, peak memory.

    python bench/methods.py                       # all available methods, default settings
    python bench/methods.py --methods lora prefix --steps 200 -- --batch-size 8

Each method runs as its own ``jpeft train`` process (so peak memory is its own) with
the method's default options and learning rate; arguments after ``--`` go to every
run. Prints a markdown table and the command lines that produced it.
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

from jpeft.train.methods import SPECS

HEADER = (
    "| method | trainable params | % of base | accuracy before | accuracy after "
    "| step time | peak memory |\n|---|---:|---:|---:|---:|---:|---:|"
)


def run_method(method: str, steps: int, out: str, extra: list[str]) -> tuple[list[str], dict]:
    """Train one method in a subprocess; ``(command, summary.json)``."""
    command = ["jpeft", "train", "--method", method, "--steps", str(steps), *extra]
    run_dir = os.path.join(out, method)
    argv = [sys.executable, "-m", "jpeft.train.cli", *command[1:], "--output-dir", run_dir]
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    started = time.perf_counter()
    proc = subprocess.run(argv, cwd=repo, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed ({proc.returncode}):\n{proc.stderr}")
    with open(os.path.join(run_dir, "summary.json"), encoding="utf-8") as f:
        summary = json.load(f)
    summary["wall_s"] = time.perf_counter() - started
    return command, summary


def row(summary: dict) -> str:
    """One markdown table row from a run's ``summary.json``.

    Example:
        >>> row({"method": "lora", "trainable_params": 1000, "trainable_percent": 0.1,
        ...      "before": {"eval_accuracy": 0.0}, "after": {"eval_accuracy": 0.9},
        ...      "step_time_s": 0.05, "peak_memory_bytes": 2**30,
        ...      "peak_memory_kind": "host peak RSS"})
        '| lora | 1,000 | 0.10% | 0.0% | 90.0% | 50.0 ms | 1024 MiB (host peak RSS) |'
    """
    before = (summary.get("before") or {}).get("eval_accuracy")
    after = summary["after"].get("eval_accuracy")
    memory = f"{summary['peak_memory_bytes'] / 2**20:.0f} MiB ({summary['peak_memory_kind']})"
    return (
        f"| {summary['method']} | {summary['trainable_params']:,} "
        f"| {summary['trainable_percent']:.2f}% | {_pct(before)} | {_pct(after)} "
        f"| {1000 * summary['step_time_s']:.1f} ms | {memory} |"
    )


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.1f}%"


def main() -> None:
    available = [spec.name for spec in SPECS if spec.available()]
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", nargs="+", default=available, choices=available)
    parser.add_argument("--steps", type=int, default=300, help="steps per method")
    parser.add_argument("--out", help="directory for the runs (default: a temporary one)")
    parser.add_argument("extra", nargs="*", help="more jpeft train flags (after --)")
    args = parser.parse_args()
    out = args.out or tempfile.mkdtemp(prefix="jpeft-bench-")
    rows, commands = [], []
    for method in args.methods:
        command, summary = run_method(method, args.steps, out, args.extra)
        rows.append(row(summary))
        commands.append(shlex.join(command))
        print(f"{method}: done in {summary['wall_s']:.0f}s", file=sys.stderr, flush=True)
    skipped = [spec.name for spec in SPECS if not spec.available()]
    print(f"machine: {platform.machine()}, {os.cpu_count()} CPU cores ({platform.platform()})\n")
    print(HEADER)
    print("\n".join(rows))
    if skipped:
        print(f"\nnot available in this build: {', '.join(skipped)}")
    print("\ncommands:\n" + "\n".join(f"    {c}" for c in commands))


if __name__ == "__main__":
    main()
