"""bitsandbytes' 8-bit dynamic quantization map and blockwise 8-bit quantization.

The dynamic map (Dettmers, "8-Bit Approximations for Parallelism in Deep Learning") is a
256-entry float32 codebook on ``[-1, 1]`` (signed) or ``[0, 1]`` (unsigned). Blockwise
quantization cuts the flattened, row-major tensor into blocks of ``blocksize`` values, scales
each block by its absolute maximum and stores one codebook index (uint8) per value plus one
float32 absmax per block; a partial last block has its own absmax.

Everything here is bit-identical to ``bitsandbytes.functional`` (``create_dynamic_map``,
``quantize_blockwise``, ``dequantize_blockwise``) on its CPU backend. That backend does not
pick the exact nearest code: it rounds ``x / absmax`` onto a 65536-bin grid over ``[-1, 1]``
(``idx = trunc(((v + 1) * 0.5) * 65535 + 0.5)``) and maps each bin to the nearest code of the
bin's left edge ``-1 + 2 * idx / 65535``, ties going to the lower code. Both steps are
reproduced exactly here.

Example:
    >>> import jax.numpy as jnp
    >>> code = jnp.asarray(dynamic_map(signed=True))
    >>> x = jnp.linspace(-2.0, 2.0, 300)
    >>> q, absmax = quantize_blockwise(x, code, blocksize=256)
    >>> q.shape, absmax.shape
    ((300,), (2,))
    >>> y = dequantize_blockwise(q, absmax, code, 256, x.shape)
    >>> bool(jnp.max(jnp.abs(y - x)) < 0.02)
    True
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

_MAX_EXPONENT_BITS = 7
_LUT_BINS = 65536
_FLOAT_DTYPES = (jnp.float32, jnp.bfloat16, jnp.float16)
# Left edges ``-1 + 2 * i / 65535`` of the grid bins, rounded as bitsandbytes' C++ does. Built
# with numpy: under jit, XLA would turn the division by a constant into a (differently
# rounded) multiplication by its reciprocal.
_BIN_LEFT_EDGES = np.float32(-1.0) + (
    np.float32(2.0) * np.arange(_LUT_BINS, dtype=np.float32)
) / np.float32(_LUT_BINS - 1)


def _torch_linspace_f32(start: float, end: float, steps: int) -> np.ndarray:
    """``torch.linspace(start, end, steps, dtype=float32)`` as torch's CPU kernel computes it.

    The first half is ``start + step * i`` and the second half ``end - step * (steps - 1 - i)``,
    each rounded once to float32 (a fused multiply-add). The float64 products and sums below are
    exact for the ranges used by :func:`dynamic_map`, so the final cast is that single rounding.
    """
    lo, hi = np.float32(start), np.float32(end)
    step = np.float32((hi - lo) / np.float32(steps - 1))
    i = np.arange(steps, dtype=np.float64)
    first = np.float64(lo) + np.float64(step) * i
    second = np.float64(hi) - np.float64(step) * (steps - 1 - i)
    return np.where(i < steps // 2, first, second).astype(np.float32)


def dynamic_map(signed: bool = True) -> np.ndarray:
    """The 256-value dynamic quantization codebook, sorted ascending.

    For each decade ``10**-6 .. 10**0`` the codebook holds the midpoints of an even split of
    ``[0.1, 1]`` scaled by that decade (``2**i`` midpoints for decade ``i`` when signed, mirrored
    to negative values; ``2**(i+1)`` when unsigned), plus the values 0 and 1. Bit-identical to
    ``bitsandbytes.functional.create_dynamic_map(signed=signed)``.

    Example:
        >>> m = dynamic_map(signed=False)
        >>> m.shape, m.dtype, float(m[0]), float(m[-1])
        ((256,), dtype('float32'), 0.0, 1.0)
    """
    parts = [np.array([0.0, 1.0], dtype=np.float32)]
    for i in range(_MAX_EXPONENT_BITS):
        n_means = 2**i if signed else 2 ** (i + 1)
        bounds = _torch_linspace_f32(0.1, 1.0, n_means + 1)
        means = (bounds[:-1] + bounds[1:]) / np.float32(2.0)
        scaled = np.float32(10.0 ** (i + 1 - _MAX_EXPONENT_BITS)) * means
        parts.append(scaled)
        if signed:
            parts.append(-scaled)
    return np.sort(np.concatenate(parts)).astype(np.float32)


def _check_code(code: jax.Array) -> None:
    if code.shape != (256,) or code.dtype != jnp.float32:
        raise ValueError(
            f"code: expected a float32 array of shape (256,), found {code.dtype} {code.shape}"
        )


def _check_blocksize(blocksize: int) -> None:
    if not isinstance(blocksize, int) or blocksize <= 0:
        raise ValueError(f"blocksize: expected a positive int, found {blocksize!r}")


def _midpoints(code: np.ndarray | jax.Array) -> np.ndarray | jax.Array:
    return np.float32(0.5) * (code[:-1] + code[1:])


@functools.lru_cache(maxsize=16)
def _bin_to_code_cached(code_bytes: bytes) -> np.ndarray:
    midpoints = _midpoints(np.frombuffer(code_bytes, dtype=np.float32))
    return np.searchsorted(midpoints, _BIN_LEFT_EDGES, side="left").astype(np.uint8)


def _bin_to_code(code: jax.Array) -> np.ndarray | jax.Array:
    """Codebook index (uint8) for each of the 65536 grid bins over ``[-1, 1]``.

    A concrete codebook gets a cached numpy table, which is a constant under jit; a traced
    codebook gets the same table computed in the graph.
    """
    if isinstance(code, jax.core.Tracer):
        return jnp.searchsorted(_midpoints(code), _BIN_LEFT_EDGES, side="left").astype(jnp.uint8)
    return _bin_to_code_cached(np.asarray(code, dtype=np.float32).tobytes())


def _as_blocks(flat: jax.Array, blocksize: int) -> jax.Array:
    n_blocks = math.ceil(flat.size / blocksize)
    return jnp.pad(flat, (0, n_blocks * blocksize - flat.size)).reshape(n_blocks, blocksize)


@functools.partial(jax.jit, static_argnames="blocksize")
def _quantize(x: jax.Array, bin_to_code: jax.Array, blocksize: int) -> tuple[jax.Array, jax.Array]:
    flat = x.reshape(-1).astype(jnp.float32)
    blocks = _as_blocks(flat, blocksize)
    absmax = jnp.max(jnp.abs(blocks), axis=1)
    nonzero = absmax > 0
    inv = jnp.float32(1.0) / jnp.where(nonzero, absmax, jnp.float32(1.0))
    scaled = jnp.clip(blocks * inv[:, None], -1.0, 1.0)
    bins = ((scaled + 1.0) * 0.5 * jnp.float32(_LUT_BINS - 1) + 0.5).astype(jnp.int32)
    codes = jnp.where(nonzero[:, None], bin_to_code[bins], jnp.uint8(0))
    return codes.reshape(-1)[: flat.size], absmax


@functools.partial(jax.jit, static_argnames=("blocksize", "shape", "dtype"))
def _dequantize(
    codes: jax.Array,
    absmax: jax.Array,
    code: jax.Array,
    blocksize: int,
    shape: tuple[int, ...],
    dtype: jnp.dtype,
) -> jax.Array:
    values = code[_as_blocks(codes.reshape(-1), blocksize)] * absmax.astype(jnp.float32)[:, None]
    return values.reshape(-1)[: math.prod(shape)].reshape(shape).astype(dtype)


def quantize_blockwise(
    x: jax.Array, code: jax.Array, blocksize: int = 256
) -> tuple[jax.Array, jax.Array]:
    """Blockwise 8-bit quantization of ``x`` with codebook ``code``.

    Args:
        x: float32, bfloat16 or float16 array of any shape (read as float32, row-major).
        code: the float32 ``[256]`` codebook, e.g. ``jnp.asarray(dynamic_map())``.
        blocksize: values per block (bitsandbytes documents 64 ... 4096; any positive int works).

    Returns:
        ``(codes, absmax)``: uint8 ``[x.size]`` codebook indices and float32
        ``[ceil(x.size / blocksize)]`` per-block absolute maxima. An all-zero block gets absmax 0
        and codes 0. Exact zeros in a nonzero block land on the code nearest ``1.5e-5`` (the
        CPU backend's grid quirk), e.g. ``5.3e-6`` after scaling by ``absmax=0.25`` below.
        Codes for non-finite inputs are unspecified.

    Example:
        >>> import jax.numpy as jnp
        >>> code = jnp.asarray(dynamic_map())
        >>> q, absmax = quantize_blockwise(jnp.array([[0.5, -1.0], [0.25, 0.0]]), code, 2)
        >>> q.tolist(), absmax.tolist()
        ([219, 0, 255, 131], [1.0, 0.25])
    """
    _check_code(code)
    _check_blocksize(blocksize)
    if x.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"x: expected float32, bfloat16 or float16, found {x.dtype}")
    return _quantize(x, _bin_to_code(code), blocksize)


def dequantize_blockwise(
    codes: jax.Array,
    absmax: jax.Array,
    code: jax.Array,
    blocksize: int,
    shape: tuple[int, ...],
    dtype: jnp.dtype = jnp.float32,
) -> jax.Array:
    """Inverse of :func:`quantize_blockwise`: ``code[codes] * absmax[block]`` reshaped to ``shape``.

    The product is formed in float32 and then cast to ``dtype`` (float32, bfloat16 or float16).

    Example:
        >>> import jax.numpy as jnp
        >>> code = jnp.asarray(dynamic_map())
        >>> q, absmax = quantize_blockwise(jnp.array([[0.5, -1.0], [0.25, 0.0]]), code, 2)
        >>> y = dequantize_blockwise(q, absmax, code, 2, (2, 2))
        >>> [[round(float(v), 3) for v in row] for row in y]
        [[0.501, -0.993], [0.25, 0.0]]
    """
    _check_code(code)
    _check_blocksize(blocksize)
    dtype = jnp.dtype(dtype)
    if dtype not in _FLOAT_DTYPES:
        raise ValueError(f"dtype: expected float32, bfloat16 or float16, found {dtype}")
    shape = tuple(int(d) for d in shape)
    size = math.prod(shape)
    if codes.dtype != jnp.uint8 or codes.size != size:
        raise ValueError(
            f"codes: expected uint8 with {size} elements for shape {shape}, "
            f"found {codes.dtype} with {codes.size}"
        )
    n_blocks = math.ceil(size / blocksize)
    if absmax.shape != (n_blocks,):
        raise ValueError(f"absmax: expected shape ({n_blocks},), found {absmax.shape}")
    return _dequantize(codes, absmax, code, blocksize, shape, dtype)
