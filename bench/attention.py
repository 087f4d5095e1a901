"""Attention on an H100 target: the 1.1B LoRA step's peak per ``attention_impl``, and a
check that ``auto`` never materialises a ``[T, T]`` mask or score buffer.

Compiles deviceless (:mod:`deviceless`) and reads the optimized HLO. The check,
:func:`square_buffers`, lists every buffer shape with two dimensions equal to the
sequence length; it runs on programs whose other dimensions all differ from ``T``:
attention alone (forward and backward, padding plus prefix keys, T=2048) and the whole
1.1B LoRA train step at T=1024 (hidden is 2048). The script exits with status 1 if
``auto`` has any. cuDNN is left out: its custom calls need a device to compile.

    JAX_PLATFORMS=cpu python bench/attention.py
"""

from __future__ import annotations

import argparse
import re
import shlex
import sys

import jax
import jax.numpy as jnp
from deviceless import abstract, compile_on, gpu_target_available, peak_bytes, target_mesh
from lora_step import lora_step

from jpeft.models.attention import CausalMask, attend

B, T, H, K, D, PREFIX = 4, 2048, 32, 4, 64, 20


def square_buffers(hlo: str, t: int) -> list[str]:
    """Shapes in ``hlo`` text with at least two dimensions equal to ``t``.

    Example:
        >>> square_buffers("%a = pred[4,8,8]{2,1,0} %b = f32[8,4]", 8)
        ['pred[4,8,8]']
    """
    shapes = re.findall(r"\b([a-z]+[0-9]*)\[([0-9,]+)\]", hlo)
    return sorted({f"{d}[{dims}]" for d, dims in shapes if dims.split(",").count(str(t)) >= 2})


def attention_program(mesh, implementation: str):
    """Forward and backward of one attention layer over padded rows with prefix keys."""
    s = jax.ShapeDtypeStruct
    args = abstract(
        (
            s((B, T, H, D), jnp.bfloat16),
            s((B, T, K, D), jnp.bfloat16),
            s((B, T, K, D), jnp.bfloat16),
            s((B, PREFIX, K, D), jnp.bfloat16),
            s((B, T), jnp.int32),
        ),
        mesh,
    )

    def grads(q, k, v, prefix, valid):
        def loss(q, k, v, prefix):
            out = attend(q, k, v, CausalMask(valid), prefix=(prefix, prefix),
                         implementation=implementation)  # fmt: skip
            return jnp.sum(out.astype(jnp.float32) ** 2)

        return jax.grad(loss, argnums=(0, 1, 2, 3))(q, k, v, prefix)

    return compile_on(mesh, grads, *args)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--attention", nargs="+", default=["auto", "xla"])
    parser.add_argument("--remat", default="full")
    args = parser.parse_args()
    mesh = target_mesh()
    target = "H100 (deviceless)" if gpu_target_available() else "CPU (no CUDA plugin)"
    print(f"compiled for {target}; 1.1B LoRA r=16 all-linear, B=4, bf16, AdamW, "
          f"remat={args.remat}\n")  # fmt: skip
    print("| attention | attention alone: peak MiB, [T,T] buffers | "
          "1.1B step T=2048: peak GB | 1.1B step T=1024: [T,T] buffers |")  # fmt: skip
    print("|---|---|---:|---|")
    failed = False
    for impl in args.attention:
        alone = attention_program(mesh, impl)
        alone_square = square_buffers(alone.as_text(), T)
        step, inputs = lora_step(mesh, remat=args.remat, attention_impl=impl)
        peak = peak_bytes(compile_on(mesh, step, *inputs, donate_argnums=(0,)))
        step, inputs = lora_step(mesh, remat=args.remat, attention_impl=impl, seq=1024)
        step_square = square_buffers(
            compile_on(mesh, step, *inputs, donate_argnums=(0,)).as_text(), 1024
        )
        alone_cell = f"{peak_bytes(alone) / 2**20:.0f}, {' '.join(alone_square) or 'none'}"
        print(f"| {impl} | {alone_cell} | {peak / 1e9:.2f} | {' '.join(step_square) or 'none'} |",
              flush=True)  # fmt: skip
        failed |= impl == "auto" and bool(alone_square or step_square)
    print(f"\n    JAX_PLATFORMS=cpu python {shlex.join(sys.argv)}")
    if failed:
        sys.exit("attention_impl='auto' materialised a [T, T] buffer")


if __name__ == "__main__":
    main()
