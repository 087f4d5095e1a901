"""Where the numbers of a 4-bit Flax kernel ``[..., in, out]`` lie: two layouts.

bitsandbytes quantizes the torch weight ``[out, in]`` (the kernel transposed) flattened
row-major, in blocks of ``blocksize`` consecutive values (:mod:`jpeft.quant.fourbit`).
Every leading index of a kernel (a scanned layer) is one bitsandbytes tensor. jpeft
holds those exact bits in one of two layouts, chosen by the width ``in``:

* **kernel layout** (``in % blocksize == 0``): no block crosses an output row, so
  ``packed`` is uint8 ``[..., out, in // 2]`` and ``absmax`` ``[..., out, in // blocksize]``.
  Both shard along ``out`` and ``in`` like the base kernel, and a GEMM tile (a run of
  output rows times a run of ``in``) finds its scales next to its codes: the fused
  kernels of :mod:`jpeft.quant.kernels` read this layout. Converting to bitsandbytes'
  flat arrays is a reshape (:func:`kernel_to_flat`, :func:`flat_to_kernel`).
* **flat layout** (any other width, e.g. hidden size 72, or an intermediate size of
  8640 with blocksize 128): blocks run across row ends, so absmax has no
  ``[out, in / blocksize]`` arrangement. Padding each row to a multiple of the
  blocksize would cut different blocks, hence other absmax values and codes than
  bitsandbytes', so jpeft keeps bitsandbytes' own arrays: ``packed``
  ``[..., (out * in + 1) // 2]`` and ``absmax`` ``[..., ceil(out * in / blocksize)]``
  (:func:`quantize_flat`, :func:`dequantize_flat`). Reading and writing a checkpoint
  stays a reshape and every bit matches. The price: these arrays have no ``in``/``out``
  axis to shard (only the leading layer axis), and the XLA dequantize-then-dot path
  serves them.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from jpeft.quant.fourbit import (
    check_blocksize,
    check_float_dtype,
    check_quant_type,
    decode_table,
    dequantize_4bit,
    encode,
    inverse_absmax,
    quantize_4bit,
    unpack,
)


def fits_kernel_layout(in_features: int, blocksize: int) -> bool:
    """Whether a kernel with ``in_features`` rows takes the kernel layout (else the flat one).

    Example:
        >>> fits_kernel_layout(8640, 64), fits_kernel_layout(8640, 128)
        (True, False)
    """
    return in_features % check_blocksize(blocksize) == 0


def _check_kernel(shape: tuple[int, ...], blocksize: int) -> tuple[int, int]:
    if len(shape) < 2:
        raise ValueError(f"a kernel must be [..., in, out], got shape {shape}")
    d_in, d_out = shape[-2], shape[-1]
    if d_in % blocksize:
        raise ValueError(
            f"the kernel layout needs in_features % blocksize == 0, but kernel shape {shape} "
            f"has in_features={d_in} and blocksize={blocksize}; use the flat layout "
            f"(quantize_flat)"
        )
    return d_in, d_out


@functools.partial(jax.jit, static_argnames=("quant_type", "blocksize"))
def quantize_kernel(
    kernel: jax.Array, quant_type: str = "nf4", blocksize: int = 64
) -> tuple[jax.Array, jax.Array]:
    """Quantize a Flax kernel ``[..., in, out]`` with blocks along ``in`` (kernel layout).

    Returns ``(packed uint8 [..., out, in // 2], absmax float32 [..., out, in // blocksize])``;
    each leading index equals bitsandbytes' quantization of the torch weight
    ``kernel[i].T`` (see :func:`kernel_to_flat`).

    Example:
        >>> packed, absmax = quantize_kernel(jnp.ones((2, 128, 3)), "nf4", 64)
        >>> packed.shape, absmax.shape
        ((2, 3, 64), (2, 3, 2))
    """
    check_quant_type(quant_type)
    check_blocksize(blocksize)
    check_float_dtype("kernel.dtype", kernel.dtype)
    d_in, d_out = _check_kernel(kernel.shape, blocksize)
    lead = kernel.shape[:-2]
    # Work in the kernel's own [in, out] order and transpose only the small results: a
    # transposed read fused into the encoding is ~15x slower on CPU.
    blocks = kernel.astype(jnp.float32).reshape(*lead, d_in // blocksize, blocksize, d_out)
    absmax = jnp.max(jnp.abs(blocks), axis=-2)
    scaled = jnp.clip(blocks * inverse_absmax(absmax)[..., None, :], -1.0, 1.0)
    codes = encode(scaled, quant_type).reshape(*lead, d_in // 2, 2, d_out)
    packed = (codes[..., 0, :] << 4) | codes[..., 1, :]
    return jnp.swapaxes(packed, -1, -2), jnp.swapaxes(absmax, -1, -2)


@functools.partial(jax.jit, static_argnames=("quant_type", "blocksize", "dtype"))
def dequantize_kernel(
    packed: jax.Array,
    absmax: jax.Array,
    quant_type: str = "nf4",
    blocksize: int = 64,
    dtype: jnp.dtype = jnp.bfloat16,
) -> jax.Array:
    """Inverse of :func:`quantize_kernel`: returns the kernel ``[..., in, out]`` in ``dtype``.

    Example:
        >>> packed, absmax = quantize_kernel(jnp.ones((128, 3)), "nf4", 64)
        >>> dequantize_kernel(packed, absmax, "nf4", 64, jnp.float32).shape
        (128, 3)
    """
    check_quant_type(quant_type)
    check_blocksize(blocksize)
    check_float_dtype("dtype", dtype)
    if packed.ndim < 2:
        raise ValueError(f"kernel-layout packed must be [..., out, in // 2], got {packed.shape}")
    *lead, d_out, half = packed.shape
    d_in = 2 * half
    if d_in % blocksize or absmax.shape != (*lead, d_out, d_in // blocksize):
        raise ValueError(
            f"packed {packed.shape} (in_features={d_in}) with blocksize {blocksize} needs "
            f"absmax of shape {(*lead, d_out, d_in // blocksize)}, got {absmax.shape}"
        )
    values = jnp.asarray(decode_table(quant_type))[unpack(packed)]
    values = values.reshape(*lead, d_out, d_in // blocksize, blocksize)
    w = (values * absmax.astype(jnp.float32)[..., None]).astype(dtype)
    return jnp.swapaxes(w.reshape(*lead, d_out, d_in), -1, -2)


def kernel_to_flat(packed: jax.Array, absmax: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Kernel layout -> bitsandbytes' flat layout, per leading index.

    ``packed [..., out, in // 2] -> [..., out * in // 2, 1]`` and
    ``absmax [..., out, nb] -> [..., out * nb]``. Works for fp32 absmax and for the
    uint8 codes of a double-quantized absmax alike.

    Example:
        >>> p, a = kernel_to_flat(jnp.zeros((3, 64), jnp.uint8), jnp.ones((3, 2)))
        >>> p.shape, a.shape
        ((192, 1), (6,))
    """
    if packed.ndim < 2 or absmax.shape[:-1] != packed.shape[:-1]:
        raise ValueError(
            f"kernel-layout packed [..., out, in/2] and absmax [..., out, nb] must agree on "
            f"[..., out]; got packed {packed.shape} and absmax {absmax.shape}"
        )
    lead = packed.shape[:-2]
    return packed.reshape(*lead, -1, 1), absmax.reshape(*lead, -1)


def flat_to_kernel(
    packed: jax.Array, absmax: jax.Array, torch_shape: tuple[int, int], blocksize: int = 64
) -> tuple[jax.Array, jax.Array]:
    """bitsandbytes' flat layout of a torch weight ``[out, in]`` -> kernel layout.

    ``packed [..., out * in // 2, 1] -> [..., out, in // 2]`` and
    ``absmax [..., nb] -> [..., out, in // blocksize]`` (fp32 or uint8 codes).

    Example:
        >>> p, a = flat_to_kernel(jnp.zeros((192, 1), jnp.uint8), jnp.ones(6), (3, 128), 64)
        >>> p.shape, a.shape
        ((3, 64), (3, 2))
    """
    check_blocksize(blocksize)
    d_out, d_in = (int(d) for d in torch_shape)
    _check_kernel((d_in, d_out), blocksize)
    lead = packed.shape[:-2]
    n = d_out * d_in
    if packed.shape[-2:] != (n // 2, 1) or absmax.shape != (*lead, n // blocksize):
        raise ValueError(
            f"torch shape {torch_shape} with blocksize {blocksize} needs packed "
            f"[..., {n // 2}, 1] and absmax [..., {n // blocksize}]; got packed "
            f"{packed.shape} and absmax {absmax.shape}"
        )
    return (
        packed.reshape(*lead, d_out, d_in // 2),
        absmax.reshape(*lead, d_out, d_in // blocksize),
    )


def _flat_lead(kernel_shape: tuple[int, ...]) -> tuple[tuple[int, ...], int, int]:
    if len(kernel_shape) < 2:
        raise ValueError(f"a kernel must be [..., in, out], got shape {kernel_shape}")
    *lead, d_in, d_out = kernel_shape
    return tuple(lead), d_in, d_out


@functools.partial(jax.jit, static_argnames=("quant_type", "blocksize"))
def quantize_flat(
    kernel: jax.Array, quant_type: str = "nf4", blocksize: int = 64
) -> tuple[jax.Array, jax.Array]:
    """Quantize a Flax kernel ``[..., in, out]`` into bitsandbytes' flat layout, any width.

    Returns ``(packed uint8 [..., (out * in + 1) // 2], absmax float32 [..., nb])`` with
    ``nb = ceil(out * in / blocksize)``: each leading index is exactly
    ``bitsandbytes.functional.quantize_4bit(kernel[i].T)`` (its packed ``[:, 0]``).

    Example:
        >>> packed, absmax = quantize_flat(jnp.ones((2, 72, 3)), "nf4", 64)
        >>> packed.shape, absmax.shape
        ((2, 108), (2, 4))
    """
    check_quant_type(quant_type)
    check_blocksize(blocksize)
    check_float_dtype("kernel.dtype", kernel.dtype)
    lead, d_in, d_out = _flat_lead(kernel.shape)
    torch_layout = jnp.swapaxes(kernel, -1, -2).reshape(-1, d_out, d_in)
    packed, absmax = jax.vmap(lambda w: quantize_4bit(w, quant_type, blocksize))(torch_layout)
    return packed.reshape(*lead, -1), absmax.reshape(*lead, -1)


@functools.partial(jax.jit, static_argnames=("kernel_shape", "quant_type", "blocksize", "dtype"))
def dequantize_flat(
    packed: jax.Array,
    absmax: jax.Array,
    kernel_shape: tuple[int, int],
    quant_type: str = "nf4",
    blocksize: int = 64,
    dtype: jnp.dtype = jnp.bfloat16,
) -> jax.Array:
    """Inverse of :func:`quantize_flat`: the kernel ``[..., in, out]`` in ``dtype``.

    ``kernel_shape`` is one layer's ``(in, out)``; ``packed`` and ``absmax`` may carry
    leading axes.

    Example:
        >>> packed, absmax = quantize_flat(jnp.ones((72, 3)), "nf4", 64)
        >>> dequantize_flat(packed, absmax, (72, 3), "nf4", 64, jnp.float32).sum().item()
        216.0
    """
    d_in, d_out = (int(d) for d in kernel_shape)
    n = d_in * d_out
    lead = packed.shape[:-1]
    nblocks = -(-n // check_blocksize(blocksize))
    if packed.shape[-1:] != ((n + 1) // 2,) or absmax.shape != (*lead, nblocks):
        raise ValueError(
            f"a flat-layout kernel {(d_in, d_out)} with blocksize {blocksize} needs packed "
            f"[..., {(n + 1) // 2}] and absmax [..., {nblocks}]; got packed {packed.shape} and "
            f"absmax {absmax.shape}"
        )

    def one(p: jax.Array, a: jax.Array) -> jax.Array:
        return dequantize_4bit(p, a, (d_out, d_in), quant_type, blocksize, dtype)

    rows = math.prod(lead)
    torch_layout = jax.vmap(one)(packed.reshape(rows, -1), absmax.reshape(rows, -1))
    return jnp.swapaxes(torch_layout.reshape(*lead, d_out, d_in), -1, -2)


def bnb_to_layout(
    key: str, packed: np.ndarray, absmax: np.ndarray, torch_shape: tuple[int, int], blocksize: int
) -> tuple[np.ndarray, np.ndarray]:
    """One bitsandbytes tensor's flat arrays, arranged in the layout its width takes.

    ``packed [(n + 1) // 2, 1]`` and ``absmax [nb]`` (fp32, or the uint8 codes of a
    double-quantized absmax) of a torch weight ``[out, in]``; returns them in the kernel
    layout when ``in % blocksize == 0`` (:func:`flat_to_kernel`), else in the flat one
    (``packed [(n + 1) // 2]``, ``absmax`` as is).

    Raises:
        ValueError: naming ``key``, when the array shapes do not fit ``torch_shape``.

    Example:
        >>> p, a = bnb_to_layout("w", np.zeros((108, 1), np.uint8), np.ones(4), (3, 72), 64)
        >>> p.shape, a.shape
        ((108,), (4,))
    """
    d_out, d_in = (int(d) for d in torch_shape)
    n = d_out * d_in
    nblocks = -(-n // check_blocksize(blocksize))
    if packed.shape != ((n + 1) // 2, 1) or absmax.shape != (nblocks,):
        raise ValueError(
            f"{key}: torch shape {torch_shape} with blocksize {blocksize} needs packed "
            f"[{(n + 1) // 2}, 1] and absmax [{nblocks}]; got packed {list(packed.shape)} and "
            f"absmax {list(absmax.shape)}"
        )
    if fits_kernel_layout(d_in, blocksize):
        return flat_to_kernel(packed, absmax, (d_out, d_in), blocksize)
    return packed.reshape(-1), absmax
