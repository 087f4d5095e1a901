"""Training-size 4-bit matmul (M > 64): a tiled GEMM that dequantizes in its prologue.

Algorithm: the classic tiled GEMM of Triton's matrix-multiplication tutorial (one program
per ``[bm, bn]`` output tile, a loop over K in steps of ``bk`` with an fp32 accumulator),
with one change: the weight operand of each step is not loaded from a 16-bit matrix but
made in the step's prologue from the packed 4-bit codes and their (double-quantized)
scales (:func:`jpeft.quant.kernels.tiles.dequantize_tile`), so no 16-bit weight exists
in memory. bitsandbytes itself dequantizes to a full 16-bit weight and calls cuBLAS at
these sizes (``bitsandbytes.functional.dequantize_4bit`` in ``MatMul4Bit``); the fused
prologue is what QLoRA training on a GPU needs to stop paying that copy.

Tile sizes are fixed heuristics for H100-class GPUs (no autotuning): 128x128 output tiles
(64 rows for 64 < M < 128), ``bk = min(64, blocksize)``.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Any

import jax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from jpeft.quant.kernels.tiles import (
    WeightSpec,
    cost,
    largest_tile,
    pad_rows,
    weight_operands,
    weight_spec,
    x_wt,
)

if TYPE_CHECKING:
    from jpeft.quant.node import QuantizedWeight

N_TILES = (128, 64, 32, 16)


def _kernel(x_ref: Any, *refs: Any, spec: WeightSpec, bm: int, bn: int, bk: int) -> None:
    *weight_refs, out_ref = refs
    m0 = pl.multiple_of(pl.program_id(0) * bm, bm)
    row0 = pl.multiple_of(pl.program_id(1) * bn, bn)
    acc = x_wt(x_ref, m0, bm, spec, tuple(weight_refs), row0, bn, 0, spec.k // bk, bk)
    out_ref[...] = acc.astype(out_ref.dtype)


def gemm(
    x: jax.Array,
    w: QuantizedWeight,
    row_base: jax.Array | int = 0,
    tables: tuple[jax.Array, ...] | None = None,
    *,
    interpret: bool = False,
) -> jax.Array:
    """``x @ W`` for ``x [M, K]`` and one layer's kernel-layout 4-bit ``W [K, N]``.

    Returns ``[M, N]`` in ``x.dtype`` (fp32 accumulation). ``N`` must be a multiple of 16;
    ``row_base`` is the first row of ``w`` in the whole weight when ``w`` is a shard of its
    rows, ``tables`` the decoding tables (both as in
    :func:`jpeft.quant.kernels.tiles.weight_operands`).

    Example:
        >>> import jax.numpy as jnp
        >>> from jpeft import quant
        >>> w4 = quant.quantize(jnp.ones((64, 16)), "nf4", 64)
        >>> gemm(jnp.ones((70, 64)), w4, interpret=True)[0, :2].tolist()
        [64.0, 64.0]
    """
    spec = weight_spec(w)
    m = x.shape[0]
    bm = 128 if m >= 128 else 64
    bn = largest_tile(spec.n, N_TILES)
    bk = min(64, spec.blocksize)
    xp = pad_rows(x, bm)
    y = pl.pallas_call(
        functools.partial(_kernel, spec=spec, bm=bm, bn=bn, bk=bk),
        out_shape=jax.ShapeDtypeStruct((xp.shape[0], spec.n), x.dtype),
        grid=(xp.shape[0] // bm, spec.n // bn),
        out_specs=pl.BlockSpec((bm, bn), lambda i, j: (i, j)),
        compiler_params=plgpu.CompilerParams(
            num_warps=8 if bm * bn >= 128 * 128 else 4, num_stages=3
        ),
        cost_estimate=cost(xp.shape[0], spec, x.dtype),
        interpret=interpret,
        name="nf4_gemm",
    )(xp, *weight_operands(w, row_base, tables))
    return y[:m]
