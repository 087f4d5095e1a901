"""The input gradient of a 4-bit matmul, ``dx = dy @ W^T``, reading the packed weight.

Algorithm: a tiled GEMM over the output ``dx [M, K]`` (one program per ``[bm, bk]`` tile,
a loop over N in steps of ``bn``), whose weight operand is dequantized in each step's
prologue (:func:`jpeft.quant.kernels.tiles.dequantize_tile`). The packed layout
``[N, K / 2]`` is already ``W^T``, so the tiles go to the tensor cores untransposed, and
an output tile of at most ``blocksize`` columns needs one scale per weight row. Together
with the forward kernels this makes the backward pass of a frozen 4-bit projection read
4-bit weights only, as bitsandbytes' ``MatMul4Bit.backward`` would with a fused kernel
(it dequantizes the full weight instead).
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from jpeft.quant.kernels.tiles import (
    MIN_TILE,
    WeightSpec,
    cost,
    dequantize_tile,
    largest_tile,
    pad_rows,
    round_up,
    weight_operands,
    weight_spec,
)

if TYPE_CHECKING:
    from jpeft.quant.node import QuantizedWeight

N_STEPS = (64, 32, 16)


def _kernel(dy_ref: Any, *refs: Any, spec: WeightSpec, bm: int, bk: int, bn: int) -> None:
    *weight_refs, out_ref = refs
    m0 = pl.multiple_of(pl.program_id(0) * bm, bm)
    col0 = pl.multiple_of(pl.program_id(1) * bk, bk)

    def step(t: jax.Array, acc: jax.Array) -> jax.Array:
        row0 = pl.multiple_of(t * bn, bn)
        dy = dy_ref[pl.ds(m0, bm), pl.ds(row0, bn)]
        w = dequantize_tile(spec, tuple(weight_refs), row0, bn, col0, bk, dy.dtype)
        return acc + plgpu.dot(dy, w)

    acc = jax.lax.fori_loop(0, spec.n // bn, step, jnp.zeros((bm, bk), jnp.float32))
    out_ref[...] = acc.astype(out_ref.dtype)


def input_grad(
    dy: jax.Array,
    w: QuantizedWeight,
    row_base: jax.Array | int = 0,
    tables: tuple[jax.Array, ...] | None = None,
    *,
    interpret: bool = False,
) -> jax.Array:
    """``dy @ W^T`` for ``dy [M, N]`` and one layer's kernel-layout 4-bit ``W [K, N]``.

    Returns ``[M, K]`` in ``dy.dtype`` (fp32 accumulation). ``N`` must be a multiple of 16;
    ``row_base`` is the first row of ``w`` in the whole weight when ``w`` is a shard of its
    rows, ``tables`` the decoding tables (both as in
    :func:`jpeft.quant.kernels.tiles.weight_operands`).

    Example:
        >>> from jpeft import quant
        >>> w4 = quant.quantize(jnp.ones((64, 16)), "nf4", 64)
        >>> input_grad(jnp.ones((3, 16)), w4, interpret=True)[0, :2].tolist()
        [16.0, 16.0]
    """
    spec = weight_spec(w)
    m = dy.shape[0]
    bm = 128 if m >= 128 else 64 if m > 64 else round_up(m, MIN_TILE)
    bk = min(64, spec.blocksize)
    bn = largest_tile(spec.n, N_STEPS)
    dyp = pad_rows(dy, bm)
    dx = pl.pallas_call(
        functools.partial(_kernel, spec=spec, bm=bm, bk=bk, bn=bn),
        out_shape=jax.ShapeDtypeStruct((dyp.shape[0], spec.k), dy.dtype),
        grid=(dyp.shape[0] // bm, spec.k // bk),
        out_specs=pl.BlockSpec((bm, bk), lambda i, c: (i, c)),
        compiler_params=plgpu.CompilerParams(num_warps=4, num_stages=3),
        cost_estimate=cost(dyp.shape[0], spec, dy.dtype),
        interpret=interpret,
        name="nf4_input_grad",
    )(dyp, *weight_operands(w, row_base, tables))
    return dx[:m]
