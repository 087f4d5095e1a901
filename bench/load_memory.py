"""Peak host memory of ``hf.load_pretrained`` against the size of the params it returns.

Writes a random LLaMA checkpoint (~300 MB fp32 by default) to a temporary directory,
then loads it in a fresh subprocess and reports that process's peak RSS
(``VmHWM``) above its RSS just before the call, less the params' own bytes (Linux)::

    python bench/load_memory.py --hidden 1024 --intermediate 2816 --layers 4 --vocab 12000
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
import psutil

from models import hf, llama
from models.config import LlamaConfig

MB = 2**20


def write_checkpoint(path: str, cfg: LlamaConfig) -> None:
    """A checkpoint of numpy-random fp32 weights (nothing big is kept after it returns)."""
    rng = np.random.default_rng(0)
    shapes = jax.eval_shape(lambda: llama.init_params(jax.random.key(0), cfg))
    params = jax.tree.map(lambda s: rng.standard_normal(s.shape, np.float32) * 0.02, shapes)
    hf.save_pretrained(path, cfg, params)


def measure(path: str) -> dict[str, float]:
    """Load ``path`` in this process and report RSS figures in MiB.

    JAX is initialized first (one tiny jit call): the XLA compiler's one-time ~50 MB
    is paid by any JAX program and is not part of loading.
    """
    jax.jit(lambda x: x + 1)(np.ones(2)).block_until_ready()
    before = psutil.Process().memory_info().rss
    cfg, params = hf.load_pretrained(path, dtype=jnp.float32)
    jax.block_until_ready(params)
    peak = _peak_rss()
    layer = sum(a.nbytes // cfg.num_hidden_layers for a in jax.tree.leaves(params["layers"]))
    largest = max(
        a.nbytes // a.shape[0] if a.ndim == 3 else a.nbytes for a in jax.tree.leaves(params)
    )
    total = sum(a.nbytes for a in jax.tree.leaves(params))
    return {
        "params": total / MB,
        "one layer": layer / MB,
        "largest tensor": largest / MB,
        "RSS before load": before / MB,
        "peak RSS": peak / MB,
        "peak - before - params": (peak - before - total) / MB,
    }


def _peak_rss() -> int:
    """This process's peak RSS in bytes: ``VmHWM`` (unlike ``ru_maxrss``, reset by exec)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status (Linux only)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--intermediate", type=int, default=2816)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--vocab", type=int, default=12000)
    parser.add_argument("--measure", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        print(json.dumps(measure(args.measure)))
        return
    cfg = LlamaConfig(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
    )
    with tempfile.TemporaryDirectory() as tmp:
        write_checkpoint(tmp, cfg)
        out = subprocess.run(
            [sys.executable, __file__, "--measure", tmp], check=True, capture_output=True, text=True
        )
    figures = json.loads(out.stdout.strip().splitlines()[-1])
    print(f"`{shlex.join(['python', *sys.argv])}`\n")
    print("| figure | MiB |\n|---|---:|")
    for name, value in figures.items():
        print(f"| {name} | {value:.1f} |")


if __name__ == "__main__":
    main()
