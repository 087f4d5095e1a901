"""Decode-size 4-bit matmul (M <= 64): split-K, reading codes and DQ scales directly.

At decode sizes the product is bound by reading the weight, so the kernel reads only the
4-bit codes and the 8-bit double-quantized scales (4.127 bits per weight at blocksize 64)
and never an fp32 absmax or a 16-bit weight. Algorithm: split-K matrix-vector product (as
in bitsandbytes' ``kgemm_4bit_inference_naive``, which also dequantizes each 4-bit block
in registers, and the split-K reduction of JAX's Pallas ``decode_attention``): the rows
are padded to a multiple of 16 (the smallest tensor-core operand), each program owns
``bn`` output columns and one of ``splits`` K ranges, and writes an fp32 partial sum;
the partials are added outside the kernel. ``splits`` is chosen so that about two
programs run per streaming multiprocessor of an H100 (132).
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
    largest_tile,
    pad_rows,
    weight_operands,
    weight_spec,
    x_wt,
)

if TYPE_CHECKING:
    from jpeft.quant.node import QuantizedWeight

MAX_M = 64  # above this the GEMM kernel (jpeft.quant.kernels.gemm) takes over
N_TILES = (64, 32, 16)
TARGET_PROGRAMS = 2 * 132  # two per H100 streaming multiprocessor
MAX_SPLITS = 16


def splits_for(spec: WeightSpec, bn: int, bk: int) -> int:
    """The number of K ranges: the smallest power of two (dividing the K steps, at most 16)
    that gives at least :data:`TARGET_PROGRAMS` programs.

    Example:
        >>> splits_for(WeightSpec(n=4096, k=4096, blocksize=64, double_quant=True), 64, 64)
        8
    """
    steps = spec.k // bk
    splits = 1
    while (
        splits * 2 <= MAX_SPLITS
        and steps % (splits * 2) == 0
        and (spec.n // bn) * splits < TARGET_PROGRAMS
    ):
        splits *= 2
    return splits


def _kernel(x_ref: Any, *refs: Any, spec: WeightSpec, m: int, bn: int, bk: int, steps: int):
    *weight_refs, out_ref = refs
    row0 = pl.multiple_of(pl.program_id(0) * bn, bn)
    col0 = pl.program_id(1) * steps * bk
    out_ref[...] = x_wt(x_ref, 0, m, spec, tuple(weight_refs), row0, bn, col0, steps, bk)


def decode(
    x: jax.Array,
    w: QuantizedWeight,
    row_base: jax.Array | int = 0,
    tables: tuple[jax.Array, ...] | None = None,
    *,
    interpret: bool = False,
) -> jax.Array:
    """``x @ W`` for few rows ``x [M, K]`` (M <= 64) and one layer's 4-bit ``W [K, N]``.

    Returns ``[M, N]`` in ``x.dtype`` (fp32 accumulation). ``N`` must be a multiple of 16;
    ``row_base`` is the first row of ``w`` in the whole weight when ``w`` is a shard of its
    rows, ``tables`` the decoding tables (both as in
    :func:`jpeft.quant.kernels.tiles.weight_operands`).

    Example:
        >>> from jpeft import quant
        >>> w4 = quant.quantize(jnp.ones((64, 16)), "nf4", 64)
        >>> decode(jnp.ones((1, 64)), w4, interpret=True)[0, :2].tolist()
        [64.0, 64.0]
    """
    spec = weight_spec(w)
    if x.shape[0] > MAX_M:
        raise ValueError(f"decode takes at most {MAX_M} rows, got x of shape {x.shape}")
    xp = pad_rows(x, MIN_TILE)
    m = xp.shape[0]
    bn = largest_tile(spec.n, N_TILES)
    bk = min(64, spec.blocksize)
    splits = splits_for(spec, bn, bk)
    partial = pl.pallas_call(
        functools.partial(_kernel, spec=spec, m=m, bn=bn, bk=bk, steps=spec.k // bk // splits),
        out_shape=jax.ShapeDtypeStruct((splits, m, spec.n), jnp.float32),
        grid=(spec.n // bn, splits),
        out_specs=pl.BlockSpec((None, m, bn), lambda j, s: (s, 0, j)),
        compiler_params=plgpu.CompilerParams(num_warps=4, num_stages=4),
        cost_estimate=cost(m, spec, x.dtype),
        interpret=interpret,
        name="nf4_decode",
    )(xp, *weight_operands(w, row_base, tables))
    return partial.sum(axis=0)[: x.shape[0]].astype(x.dtype)
