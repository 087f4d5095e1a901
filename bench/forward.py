"""Forward-pass tokens/s of jpeft (jax.jit, XLA CPU) against transformers (torch eager) on CPU.

Both run the same random weights (saved by ``models.hf.save_pretrained``, read by
``LlamaForCausalLM.from_pretrained``) in fp32 on the same CPU set: the process is
pinned to ``--threads`` cores before jax and torch start, and torch uses that many
intra-op threads. Prints a markdown table and the command that produced it::

    python bench/forward.py --hidden 256 --layers 4 --batch 8 --seq 128 --threads 2
"""

from __future__ import annotations

import argparse
import os
import platform
import shlex
import statistics
import sys
import tempfile
import time
from collections.abc import Callable


def _parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--intermediate", type=int, default=688)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--kv-heads", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--repeats", type=int, default=10)
    return parser.parse_args()


def _seconds_per_call(fn: Callable[[], object], repeats: int) -> float:
    """Median wall time of ``fn()`` after two warm-up calls (compilation, caches)."""
    fn()
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    args = _parse()
    os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[: args.threads])
    import jax
    import jax.numpy as jnp
    import numpy as np
    import torch
    import transformers

    from models import hf, llama
    from models.config import LlamaConfig

    torch.set_num_threads(args.threads)
    cfg = LlamaConfig(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads,
        max_position_embeddings=max(2048, args.seq),
    )
    params = llama.init_params(jax.random.key(0), cfg)
    with tempfile.TemporaryDirectory() as tmp:
        hf.save_pretrained(tmp, cfg, params)
        model = transformers.LlamaForCausalLM.from_pretrained(tmp, dtype=torch.float32).eval()
    ids = np.random.default_rng(0).integers(0, cfg.vocab_size, (args.batch, args.seq))

    forward = jax.jit(lambda p, x: llama.forward(p, cfg, x))
    jax_ids = jnp.asarray(ids, jnp.int32)
    torch_ids = torch.tensor(ids)

    def run_torch() -> torch.Tensor:
        with torch.inference_mode():
            return model(torch_ids).logits

    ours, ref = np.asarray(forward(params, jax_ids)), run_torch().numpy()
    err = np.abs(ours - ref).max() / np.abs(ref).max()
    rows = {
        "jpeft (jax.jit, XLA)": _seconds_per_call(
            lambda: forward(params, jax_ids).block_until_ready(), args.repeats
        ),
        f"transformers (torch eager, {model.config._attn_implementation})": _seconds_per_call(
            run_torch, args.repeats
        ),
    }
    tokens = args.batch * args.seq
    base = rows[list(rows)[-1]]
    print(f"`{shlex.join(['python', *sys.argv])}`\n")
    print(
        f"{platform.processor() or platform.machine()}, threads={args.threads}, fp32, "
        f"B={args.batch} T={args.seq}, hidden {args.hidden}, {args.layers} layers, "
        f"vocab {args.vocab}; jax {jax.__version__}, torch {torch.__version__}, "
        f"transformers {transformers.__version__}; logits max rel err {err:.1e}\n"
    )
    print("| implementation | ms / forward | tokens/s | tokens/s vs transformers |")
    print("|---|---:|---:|---:|")
    for name, seconds in rows.items():
        print(f"| {name} | {seconds * 1e3:.1f} | {tokens / seconds:,.0f} | {base / seconds:.2f}x |")


if __name__ == "__main__":
    main()
