"""What every NF4/FP4 kernel shares: the weight operands and the in-kernel dequantization.

A kernel-layout :class:`~jpeft.quant.QuantizedWeight` (one layer: ``packed [N, K / 2]``,
torch orientation ``[out, in]``) is handed to a Pallas kernel as whole arrays
(:func:`weight_operands`); :func:`dequantize_tile` turns a ``[rows, cols]`` window of it
into compute-dtype values inside the kernel, reading the packed bytes and the (possibly
double-quantized) scales where they lie. A window never crosses an absmax block
(``cols <= blocksize``, ``col0 % cols == 0``), so each row needs one scale.

The arithmetic is that of :func:`jpeft.quant.dequantize_kernel` and
:func:`jpeft.quant.double_dequantize` (bitsandbytes' ``dequantize_4bit`` and
``dequantize_blockwise``): ``table[code] * absmax`` in fp32, then a cast; with double
quantization ``absmax = dyn[code8] * nested_absmax[i // 256] + nested_offset``, the
product rounded before the add. The nibble split follows bitsandbytes' packing (first
value in the high nibble); unpacking interleaves the two nibble planes with a stack and a
reshape, which Pallas' Triton lowering emits as ``tt.join`` (Triton's ``interleave``).
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from jpeft.quant.double import NESTED_BLOCKSIZE
from jpeft.quant.dynamic import dynamic_map
from jpeft.quant.fourbit import decode_table

if TYPE_CHECKING:
    from jpeft.quant.node import QuantizedWeight

MIN_TILE = 16  # the smallest dot operand side Triton's tensor-core lowering takes


@dataclasses.dataclass(frozen=True)
class WeightSpec:
    """The static facts a kernel needs about one layer's quantized weight.

    Attributes:
        n, k: the torch-layout weight shape ``[out, in]`` (the matmul's N and K).
        blocksize: values per absmax block along K.
        double_quant: whether the scales are 8-bit codes with nested statistics.
    """

    n: int
    k: int
    blocksize: int
    double_quant: bool

    @property
    def blocks_per_row(self) -> int:
        """absmax values per output row (``K / blocksize``)."""
        return self.k // self.blocksize


def weight_spec(w: QuantizedWeight) -> WeightSpec:
    """The :class:`WeightSpec` of one layer's kernel-layout weight (no leading axes).

    Read from the arrays, so a shard of the weight (a block of its rows) describes itself.
    """
    n, half = w.packed.shape
    return WeightSpec(n, 2 * half, w.blocksize, w.double_quant)


def code_tables(w: QuantizedWeight) -> tuple[np.ndarray, ...]:
    """The constant tables a kernel decodes ``w`` with: ``(dynamic_map, table)`` under
    double quantization, else ``(table,)`` (the 16 values of :func:`decode_table`).

    Example:
        >>> from jpeft import quant
        >>> [t.shape for t in code_tables(quant.quantize(jnp.ones((64, 16)), "nf4", 64))]
        [(256,), (16,)]
    """
    table = decode_table(w.quant_type)
    return (dynamic_map(signed=True), table) if w.double_quant else (table,)


def weight_operands(
    w: QuantizedWeight, row_base: jax.Array | int = 0, tables: tuple[Any, ...] | None = None
) -> tuple[jax.Array, ...]:
    """The arrays a kernel reads: ``packed``, the scales, and the code table(s).

    ``(packed, absmax, table)`` without double quantization, else ``(packed,
    quantized_absmax, nested_absmax, nested_offset, row_base, dynamic_map, table)``.
    ``row_base`` is the index of ``w``'s first row in the whole weight (nonzero for a shard
    of its rows): the nested absmax is indexed by the position in the whole tensor.
    ``tables`` defaults to :func:`code_tables`.
    """
    tables = tuple(jnp.asarray(t) for t in (code_tables(w) if tables is None else tables))
    if not w.double_quant:
        return w.packed, w.absmax, *tables
    offset = jnp.asarray(w.nested_offset, jnp.float32)
    base = jnp.full((), row_base, jnp.int32)
    return w.packed, w.quantized_absmax, w.nested_absmax, offset, base, *tables


def largest_tile(size: int, candidates: tuple[int, ...]) -> int | None:
    """The first of ``candidates`` that divides ``size`` (None if none does).

    Example:
        >>> largest_tile(192, (128, 64, 32)), largest_tile(40, (32, 16))
        (64, None)
    """
    return next((c for c in candidates if size % c == 0), None)


def round_up(size: int, multiple: int) -> int:
    """``size`` rounded up to a multiple of ``multiple``.

    Example:
        >>> round_up(17, 16)
        32
    """
    return -(-size // multiple) * multiple


def block_scale(spec: WeightSpec, refs: tuple[Any, ...], row0: Any, rows: int, col: Any):
    """fp32 ``[rows, 1]``: the absmax of block column ``col`` for rows ``row0 ...``."""
    window = (pl.ds(row0, rows), pl.ds(col, 1))
    if not spec.double_quant:
        return refs[0][window]
    codes_ref, nested_ref, offset_ref, base_ref, dyn_ref = refs
    codes = codes_ref[window].astype(jnp.int32)
    first = base_ref[...] + row0
    flat = (first + jnp.arange(rows, dtype=jnp.int32))[:, None] * spec.blocks_per_row + col
    product = dyn_ref[codes] * nested_ref[flat // NESTED_BLOCKSIZE]
    # The select keeps the compiler from fusing the product into the add (one rounding),
    # as in double_dequantize; it only maps inf to nan.
    return jnp.where(jnp.isfinite(product), product, jnp.nan) + offset_ref[...]


def dequantize_tile(
    spec: WeightSpec,
    weight_refs: tuple[Any, ...],
    row0: Any,
    rows: int,
    col0: Any,
    cols: int,
    dtype: jnp.dtype,
) -> jax.Array:
    """``W^T[row0 : row0 + rows, col0 : col0 + cols]`` (torch ``[out, in]`` orientation).

    ``weight_refs`` are the refs of :func:`weight_operands`; ``cols`` divides the
    blocksize and ``col0`` is a multiple of ``cols``. Returns ``[rows, cols]`` in ``dtype``.
    """
    packed_ref, *scale_refs, table_ref = weight_refs
    packed = packed_ref[pl.ds(row0, rows), pl.ds(col0 // 2, cols // 2)]
    high, low = packed >> 4, packed & 0xF
    codes = jnp.stack([high, low], axis=-1).reshape(rows, cols).astype(jnp.int32)
    scale = block_scale(spec, tuple(scale_refs), row0, rows, col0 // spec.blocksize)
    return (table_ref[codes] * scale).astype(dtype)


def pad_rows(x: jax.Array, multiple: int) -> jax.Array:
    """``x [M, ...]`` with zero rows appended up to a multiple of ``multiple``.

    Example:
        >>> pad_rows(jnp.ones((3, 2)), 16).shape
        (16, 2)
    """
    return jnp.pad(x, ((0, round_up(x.shape[0], multiple) - x.shape[0]), (0, 0)))


def x_wt(
    x_ref: Any,
    m0: Any,
    m: int,
    spec: WeightSpec,
    weight_refs: tuple[Any, ...],
    row0: Any,
    bn: int,
    col0: Any,
    steps: int,
    bk: int,
) -> jax.Array:
    """fp32 ``x[m0 : m0 + m, K-range] @ W[K-range, row0 : row0 + bn]``: ``steps`` steps of ``bk``.

    The K range starts at ``col0``; each step dequantizes one ``[bn, bk]`` weight tile in
    the GEMM's prologue and feeds it to the tensor cores transposed.
    """

    def step(t: jax.Array, acc: jax.Array) -> jax.Array:
        col = pl.multiple_of(col0 + t * bk, bk)
        x = x_ref[pl.ds(m0, m), pl.ds(col, bk)]
        w = dequantize_tile(spec, weight_refs, row0, bn, col, bk, x.dtype)
        return acc + plgpu.dot(x, w, trans_b=True)

    return jax.lax.fori_loop(0, steps, step, jnp.zeros((m, bn), jnp.float32))


def cost(m: int, spec: WeightSpec, dtype: jnp.dtype) -> pl.CostEstimate:
    """FLOPs and bytes of one ``[m, K] x [K, N]`` product reading the 4-bit weight once."""
    weight_bytes = spec.n * spec.k // 2 + spec.n * spec.blocks_per_row * (
        1 if spec.double_quant else 4
    )
    activations = (m * spec.k + m * spec.n) * np.dtype(dtype).itemsize
    return pl.CostEstimate(
        flops=2 * m * spec.n * spec.k, transcendentals=0, bytes_accessed=weight_bytes + activations
    )
