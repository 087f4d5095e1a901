"""Peak host memory of ``hf.load_pretrained`` against the size of the params it returns.

Writes a random LLaMA checkpoint (~300 MB fp32 by default) to a temporary directory,
then loads it in a fresh subprocess and reports that process's peak RSS
(``VmHWM``) above its RSS just before the call, less the params' own bytes (Linux).
With ``--quantize nf4`` every decoder linear is quantized (NF4 + double quantization)
while it is streamed in, and "params returned" is the 4-bit model::

    python bench/load_memory.py --hidden 1024 --intermediate 2816 --layers 4 --vocab 12000
    python bench/load_memory.py --quantize nf4
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
import psutil
from common import peak_rss, run_self, write_checkpoint

import jpeft
from jpeft.models import hf, llama
from jpeft.models.config import LlamaConfig

MB = 2**20


def measure(path: str, quantize: str | None) -> dict[str, float]:
    """Load ``path`` in this process and report RSS figures in MiB.

    JAX is initialized first (one tiny jit call): the XLA compiler's one-time ~50 MB
    is paid by any JAX program and is not part of loading. What loading compiles (the
    copy and quantization kernels, per distinct shape: a constant, not growing with the
    number of layers) stays in "RSS after load"; "peak - after" is what loading held
    only while it ran (staging buffers, one layer's kernel).
    """
    jax.jit(lambda x: x + 1)(np.ones(2)).block_until_ready()
    before = psutil.Process().memory_info().rss
    cfg, params = hf.load_pretrained(path, dtype=jnp.float32, quantize=quantize)
    jax.block_until_ready(params)
    peak, after = peak_rss(), psutil.Process().memory_info().rss
    total = jpeft.nbytes(params)
    return {
        "checkpoint (fp32)": _fp32_bytes(cfg) / MB,
        "params returned": total / MB,
        "one layer": jpeft.nbytes(params["layers"]) / cfg.num_hidden_layers / MB,
        "largest tensor (fp32)": _largest_tensor_bytes(cfg) / MB,
        "RSS before load": before / MB,
        "RSS after load": after / MB,
        "peak RSS": peak / MB,
        "peak - before - params": (peak - before - total) / MB,
        "peak - after (transient)": (peak - after) / MB,
    }


def _fp32_bytes(cfg: LlamaConfig) -> int:
    """Bytes of the model in fp32, as the checkpoint stores it."""
    return 4 * sum(s.size for s in jax.tree.leaves(_shapes(cfg)))


def _largest_tensor_bytes(cfg: LlamaConfig) -> int:
    """Bytes of the largest single checkpoint tensor in fp32 (one layer's, for layer params)."""
    shapes = _shapes(cfg)
    per_layer = max(s.size for s in jax.tree.leaves(shapes["layers"])) // cfg.num_hidden_layers
    others = [
        s.size for key, tree in shapes.items() if key != "layers" for s in jax.tree.leaves(tree)
    ]
    return 4 * max(per_layer, *others)


def _shapes(cfg: LlamaConfig) -> dict:
    """The params' shapes; layer params are stacked ``[L, ...]``."""
    return jax.eval_shape(lambda: llama.init_params(jax.random.key(0), cfg))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--intermediate", type=int, default=2816)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--vocab", type=int, default=12000)
    parser.add_argument("--quantize", choices=["nf4"], help="quantize the linears while loading")
    parser.add_argument("--measure", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        print(json.dumps(measure(args.measure, args.quantize)))
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
        figures = run_self("--measure", tmp)
    print(f"`{shlex.join(['python', *sys.argv])}`\n")
    print("| figure | MiB |\n|---|---:|")
    for name, value in figures.items():
        print(f"| {name} | {value:.1f} |")


if __name__ == "__main__":
    main()
