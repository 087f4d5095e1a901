"""Blockwise 4-bit quantization (NF4 / FP4) of one tensor, bit-exact with bitsandbytes.

The tensor is flattened row-major and cut into blocks of ``blocksize`` values; a
partial last block gets its own absmax. ``packed`` is uint8 ``[(n + 1) // 2, 1]`` and
``absmax`` fp32 ``[ceil(n / blocksize)]``, exactly what
``bitsandbytes.functional.quantize_4bit`` returns for the torch tensor (its *flat*
layout). :mod:`jpeft.quant.layout` arranges these numbers for Flax kernels.

bitsandbytes semantics reproduced here (read from its CPU/default backend and
checked against it in ``tests/test_fourbit.py``):

* Values are upcast to fp32. A full block is scaled by ``x * (1 / absmax)`` (a
  reciprocal, then a multiply) but the partial last block by ``x / absmax`` (a true
  division); the two differ in the last bit for some values, which can move a tie.
  XLA rewrites ``x / broadcast(a)`` into ``x * (1 / a)``, so the division sits behind
  an optimization barrier.
* absmax is clamped to ``1e-38`` only for scaling, and for storage only in the
  partial block: an all-zero full block stores ``0.0``, an all-zero partial block
  stores ``1e-38`` (a subnormal).
* The scaled value is clamped to ``[-1, 1]`` and rounded to the nearest code by
  counting the midpoints of adjacent (sorted) codes it is strictly greater than:
  an exact tie goes to the lower code.
* FP4 codes are in bit order (bit 3 = sign), but bitsandbytes builds its table from
  ``-0`` as a Python *int*, so code 8 is ``+0.0``, not ``-0.0``. The stable sort puts
  code 0 before code 8: zeros and tiny *negative* values get code 0, tiny *positive*
  values (``0 < x <= 0.0026 * absmax``) get code 8. Both decode to 0.
* An odd element count is padded with one scaled ``0.0`` (NF4 code 7, FP4 code 0),
  packed high nibble first: ``byte = code[2i] << 4 | code[2i + 1]``.
* Dequantization is ``table[code] * absmax[block]`` in fp32, then a cast. For FP4 code 8
  we decode ``-0.0`` like bitsandbytes' CUDA and native CPU kernels, which read bit 3 as
  the sign; its Python fallback (used on CPU when the last dimension is odd) looks code 8
  up in the ``+0.0`` table instead. The values are equal; only the zero's sign differs.
* Blocksizes 32..4096 (powers of two) as bitsandbytes allows; anything else raises.

Backends that flush subnormals (XLA on CPU does) see a block whose absmax is below
``1.18e-38`` as all zeros; bitsandbytes keeps such values. Inputs must be finite.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

QUANT_TYPES = ("nf4", "fp4")
BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
FLOAT_DTYPES = (np.dtype(np.float32), np.dtype(jnp.bfloat16), np.dtype(np.float16))

NF4_TABLE = np.array(
    [
        -1.0,
        -0.6961928009986877,
        -0.5250730514526367,
        -0.39491748809814453,
        -0.28444138169288635,
        -0.18477343022823334,
        -0.09105003625154495,
        0.0,
        0.07958029955625534,
        0.16093020141124725,
        0.24611230194568634,
        0.33791524171829224,
        0.44070982933044434,
        0.5626170039176941,
        0.7229568362236023,
        1.0,
    ],
    dtype=np.float32,
)
NF4_TABLE.flags.writeable = False

# Bit order; both zeros are +0.0 exactly as bitsandbytes builds them; / 12 in fp32.
FP4_TABLE = np.array(
    [0, 0.0625, 8, 12, 4, 6, 2, 3, 0, -0.0625, -8, -12, -4, -6, -2, -3], dtype=np.float32
) / np.float32(12)
FP4_TABLE.flags.writeable = False

# What dequantization multiplies: FP4 code 8 (sign bit set) decodes to -0.0.
_FP4_DECODE = np.where(np.arange(16) == 8, np.float32(-0.0), FP4_TABLE)
_FP4_DECODE.flags.writeable = False
_DECODE = {"nf4": NF4_TABLE, "fp4": _FP4_DECODE}
_CLAMP = np.float32(1e-38)  # bitsandbytes' absmax clamp (a subnormal in fp32)


def check_quant_type(quant_type: str) -> str:
    """Return ``quant_type`` if it is ``"nf4"`` or ``"fp4"``, else raise ValueError.

    Example:
        >>> check_quant_type("nf4")
        'nf4'
    """
    if quant_type not in QUANT_TYPES:
        raise ValueError(f"quant_type must be one of {QUANT_TYPES}, got {quant_type!r}")
    return quant_type


def check_blocksize(blocksize: int) -> int:
    """Return ``blocksize`` if bitsandbytes accepts it for 4-bit (32..4096, powers of two).

    Example:
        >>> check_blocksize(64)
        64
    """
    valid = isinstance(blocksize, int | np.integer) and not isinstance(blocksize, bool)
    if not valid or blocksize not in BLOCKSIZES:
        raise ValueError(
            f"blocksize must be one of {BLOCKSIZES} (the sizes bitsandbytes accepts for "
            f"4-bit), got {blocksize!r}"
        )
    return int(blocksize)


def check_float_dtype(name: str, dtype: jnp.dtype) -> None:
    """Raise ValueError naming ``name`` unless ``dtype`` is one bitsandbytes quantizes.

    Example:
        >>> check_float_dtype("x.dtype", jnp.bfloat16)
    """
    if np.dtype(dtype) not in FLOAT_DTYPES:
        raise ValueError(
            f"{name} must be float32, bfloat16 or float16 (as in bitsandbytes), got {dtype}"
        )


def code_table(quant_type: str) -> np.ndarray:
    """The 16 fp32 code values of ``quant_type``, indexed by 4-bit code.

    Bit-identical to ``bitsandbytes.functional.get_4bit_type`` (what a serialized
    ``Linear4bit`` stores as ``weight.quant_map``).

    Example:
        >>> float(code_table("nf4")[7]), float(code_table("fp4")[3])
        (0.0, 1.0)
    """
    return NF4_TABLE if check_quant_type(quant_type) == "nf4" else FP4_TABLE


def decode_table(quant_type: str) -> np.ndarray:
    """The 16 fp32 values dequantization multiplies by the absmax, indexed by 4-bit code.

    :func:`code_table`, except FP4 code 8 (sign bit set) decodes to ``-0.0`` as in
    bitsandbytes' CUDA and native CPU kernels (see the module docstring).

    Example:
        >>> str(decode_table("fp4")[8]), str(code_table("fp4")[8])
        ('-0.0', '0.0')
    """
    return _DECODE[check_quant_type(quant_type)]


@functools.cache
def _rounding(quant_type: str) -> tuple[tuple[np.float32, ...], np.ndarray]:
    """Midpoints of the sorted codes (fp32) and the map from sorted position to code."""
    table = code_table(quant_type)
    order = np.argsort(table, kind="stable").astype(np.uint8)
    sorted_codes = table[order]
    bounds = (sorted_codes[:-1] + sorted_codes[1:]) / np.float32(2)
    return tuple(bounds.astype(np.float32)), order


def encode(scaled: jax.Array, quant_type: str = "nf4") -> jax.Array:
    """Round values in ``[-1, 1]`` to the nearest 4-bit code (uint8); a tie goes lower.

    Example:
        >>> encode(jnp.array([-1.0, 0.0, 1.0]), "nf4").tolist()
        [0, 7, 15]
    """
    bounds, order = _rounding(check_quant_type(quant_type))
    pos = sum((scaled > b).astype(jnp.uint8) for b in bounds)
    if quant_type == "nf4":  # the table is sorted: position == code
        return pos
    return jnp.asarray(order)[pos]


def pack(codes: jax.Array) -> jax.Array:
    """Pack 4-bit codes along the last axis (even length), first code in the high nibble.

    Example:
        >>> pack(jnp.array([1, 2, 15, 0], jnp.uint8)).tolist()
        [18, 240]
    """
    if codes.shape[-1] % 2:
        raise ValueError(f"pack needs an even last axis, got codes of shape {codes.shape}")
    codes = codes.astype(jnp.uint8)
    return (codes[..., 0::2] << 4) | codes[..., 1::2]


def unpack(packed: jax.Array) -> jax.Array:
    """Inverse of :func:`pack`: ``[..., m]`` uint8 -> ``[..., 2m]`` codes.

    Example:
        >>> unpack(jnp.array([18, 240], jnp.uint8)).tolist()
        [1, 2, 15, 0]
    """
    packed = packed.astype(jnp.uint8)
    return jnp.stack([packed >> 4, packed & 0xF], axis=-1).reshape(*packed.shape[:-1], -1)


def inverse_absmax(absmax: jax.Array) -> jax.Array:
    """``1 / clamp(absmax, 1e-38)``, with 0 where absmax is 0 (the block is all zeros).

    What bitsandbytes multiplies a full block by before rounding to codes.

    Example:
        >>> inverse_absmax(jnp.array([2.0, 0.0])).tolist()
        [0.5, 0.0]
    """
    return jnp.where(absmax > 0, 1.0 / jnp.maximum(absmax, _CLAMP), 0.0)


@functools.partial(jax.jit, static_argnames=("quant_type", "blocksize"))
def quantize_4bit(
    x: jax.Array, quant_type: str = "nf4", blocksize: int = 64
) -> tuple[jax.Array, jax.Array]:
    """Quantize ``x`` like ``bitsandbytes.functional.quantize_4bit`` (flat layout).

    Returns ``(packed uint8 [(n + 1) // 2, 1], absmax float32 [ceil(n / blocksize)])``
    for the row-major flattening of ``x`` (pass a torch-layout ``[out, in]`` weight).

    Example:
        >>> packed, absmax = quantize_4bit(jnp.ones((3, 5)), "nf4", blocksize=32)
        >>> packed.shape, absmax.tolist()
        ((8, 1), [1.0])
    """
    check_quant_type(quant_type)
    check_blocksize(blocksize)
    check_float_dtype("x.dtype", x.dtype)
    if x.size == 0:
        raise ValueError(f"cannot quantize an empty array (shape {x.shape})")
    flat = x.reshape(-1).astype(jnp.float32)
    n = flat.size
    full = n - n % blocksize
    parts_scaled, parts_absmax = [], []
    if full:
        blocks = flat[:full].reshape(-1, blocksize)
        absmax = jnp.max(jnp.abs(blocks), axis=1)
        parts_scaled.append((blocks * inverse_absmax(absmax)[:, None]).reshape(-1))
        parts_absmax.append(absmax)
    if full < n:
        tail = flat[full:]
        am = jnp.max(jnp.abs(tail))
        # Selected as integer bits: LLVM treats a float subnormal constant as 0 where XLA
        # flushes subnormals (CPU) and folds it away.
        bits = jnp.where(am > 0, lax.bitcast_convert_type(am, jnp.uint32), _CLAMP.view(np.uint32))
        stored = lax.bitcast_convert_type(bits, jnp.float32)
        divisor = jnp.maximum(am, _CLAMP)
        divisor = lax.optimization_barrier(jnp.broadcast_to(divisor, tail.shape))
        parts_scaled.append(jnp.where(am > 0, tail / divisor, 0.0))
        parts_absmax.append(stored[None])
    scaled = jnp.clip(jnp.concatenate(parts_scaled), -1.0, 1.0)
    if n % 2:
        scaled = jnp.pad(scaled, (0, 1))
    return pack(encode(scaled, quant_type))[:, None], jnp.concatenate(parts_absmax)


@functools.partial(jax.jit, static_argnames=("shape", "quant_type", "blocksize", "dtype"))
def dequantize_4bit(
    packed: jax.Array,
    absmax: jax.Array,
    shape: Sequence[int],
    quant_type: str = "nf4",
    blocksize: int = 64,
    dtype: jnp.dtype = jnp.float32,
) -> jax.Array:
    """Inverse of :func:`quantize_4bit`: ``table[code] * absmax`` in fp32, cast to ``dtype``.

    ``shape`` is the original (torch-layout) shape, a tuple.

    Example:
        >>> packed, absmax = quantize_4bit(jnp.ones((3, 5)), "nf4", blocksize=32)
        >>> dequantize_4bit(packed, absmax, (3, 5), "nf4", 32).sum().item()
        15.0
    """
    check_quant_type(quant_type)
    check_blocksize(blocksize)
    check_float_dtype("dtype", dtype)
    shape = tuple(int(d) for d in shape)
    n = int(np.prod(shape))
    nblocks = -(-n // blocksize)
    if packed.size != (n + 1) // 2 or absmax.shape != (nblocks,):
        raise ValueError(
            f"shape {shape} with blocksize {blocksize} needs {(n + 1) // 2} packed bytes and "
            f"absmax of shape ({nblocks},); got {packed.size} bytes and absmax {absmax.shape}"
        )
    values = jnp.asarray(decode_table(quant_type))[unpack(packed.reshape(-1))[:n]]
    absmax = absmax.astype(jnp.float32)
    full = n - n % blocksize
    parts = []
    if full:
        parts.append(values[:full].reshape(-1, blocksize) * absmax[: full // blocksize, None])
    if full < n:
        parts.append(values[full:] * absmax[-1])
    out = jnp.concatenate([p.reshape(-1) for p in parts])
    return out.astype(dtype).reshape(shape)
