"""What the CPU benchmarks share: model-size options, CPU pinning, timing, peak memory."""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any


def model_parser(description: str, repeats: int) -> argparse.ArgumentParser:
    """Options for a LLaMA shape, a batch, the CPU threads and timing repeats."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--intermediate", type=int, default=688)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--kv-heads", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--repeats", type=int, default=repeats)
    return parser


def pin_threads(threads: int) -> None:
    """Pin this process to ``threads`` cores (call before jax/torch start)."""
    os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[:threads])


def seconds_per_call(fn: Callable[[], object], repeats: int) -> float:
    """Median wall time of ``fn()`` after two warm-up calls (compilation, caches)."""
    fn()
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def config_from(args: argparse.Namespace):
    """The ``LlamaConfig`` the options describe."""
    from jpeft.models.config import LlamaConfig

    return LlamaConfig(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads,
        max_position_embeddings=max(2048, args.seq),
    )


def write_checkpoint(path: str, cfg) -> None:
    """Save a LLaMA of numpy-random fp32 weights (std 0.02) to ``path`` as an HF directory.

    Nothing big is kept after it returns, and no JAX computation runs.
    """
    import jax
    import numpy as np

    from jpeft.models import hf, llama

    rng = np.random.default_rng(0)
    shapes = jax.eval_shape(lambda: llama.init_params(jax.random.key(0), cfg))
    params = jax.tree.map(lambda s: rng.standard_normal(s.shape, np.float32) * 0.02, shapes)
    hf.save_pretrained(path, cfg, params)


def peak_rss() -> int:
    """This process's peak RSS in bytes: ``VmHWM`` (unlike ``ru_maxrss``, reset by exec)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status (Linux only)")


def run_self(*extra: str) -> dict[str, Any]:
    """Run this script again in a fresh process, with its own arguments plus ``extra``.

    The child prints a JSON object as its last line of output; that object is returned.
    Being a fresh process, the child's :func:`peak_rss` is its own.
    """
    argv = [sys.executable, sys.argv[0], *sys.argv[1:], *extra]
    proc = subprocess.run(argv, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"{shlex.join(argv)} failed ({proc.returncode}):\n{proc.stderr}")
    return json.loads(proc.stdout.strip().splitlines()[-1])
