"""What the CPU benchmarks share: the model-size options, CPU pinning and timing."""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable


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
    from models.config import LlamaConfig

    return LlamaConfig(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads,
        max_position_embeddings=max(2048, args.seq),
    )
