"""Double quantization of 4-bit absmax (QLoRA's "DQ"), bit-exact with bitsandbytes.

``bitsandbytes.functional.quantize_4bit(..., compress_statistics=True)`` stores the fp32
absmax of a 4-bit tensor as:

* ``offset = mean(absmax)`` (fp32),
* ``codes``: uint8, ``absmax - offset`` quantized with the signed 8-bit dynamic map in
  blocks of 256 (:mod:`jpeft.quant.dynamic`),
* ``nested_absmax``: one fp32 scale per block of 256 codes.

and recovers ``absmax = fl(dyn[code] * nested_absmax[i // 256]) + offset``: the product
is rounded before the add. XLA would contract the two into one FMA (one rounding, a
last-bit difference); :func:`double_dequantize` blocks that.

The offset is bit-exact only if the mean sums in torch's order: torch's CPU ``sum`` is a
cascade over 8-lane vectors with 4 interleaved accumulators, not a pairwise or sequential
sum, and ``mean`` is that sum divided by ``n`` in fp32. :func:`torch_mean` reproduces
torch's single-threaded reduction, which is what torch runs for fewer than 32768 absmax
values (tensors under 2M parameters at blocksize 64) or with one thread. Larger tensors
reduced by a multi-threaded torch, or by bitsandbytes on CUDA, can get an offset that
differs in the last bit; codes and scales then still agree except at rare exact ties.
Where XLA flushes subnormals (CPU), an absmax made only of subnormals (an all-zero
tensor smaller than one block stores ``1e-38``) gets offset 0 instead of ``1e-38``.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from jax import lax

from jpeft.quant import dynamic
from jpeft.quant.fourbit import check_blocksize

NESTED_BLOCKSIZE = 256  # bitsandbytes' blocksize for the absmax codes
_LANES = 8  # torch's Vectorized<float>::size() on x86 (its sum kernel is AVX2 even on AVX512)
_ILP = 4  # torch's interleaved accumulators in row_sum
_LEVELS = 4  # torch's cascade levels in multi_row_sum


def _fold(x: jax.Array, init: jax.Array | None = None) -> jax.Array:
    """Strictly sequential sum over axis 0: ``((init + x[0]) + x[1]) + ...``."""
    acc = jnp.zeros(x.shape[1:], x.dtype) if init is None else init
    for i in range(x.shape[0]):
        acc = acc + x[i]
    return acc


def _fold_groups(x: jax.Array, step: int) -> tuple[jax.Array, jax.Array]:
    """Sequential sums of full groups of ``step`` rows, and of the leftover rows."""
    full = x.shape[0] // step * step
    groups = x[:full].reshape(full // step, step, *x.shape[1:])
    return _fold(jnp.moveaxis(groups, 1, 0)), _fold(x[full:])


def _cascade(y: jax.Array) -> jax.Array:
    """torch's ``multi_row_sum`` over axis 0: chunks of ``2**p`` rows, summed in 4 levels."""
    power = max(4, (y.shape[0] - 1).bit_length() // _LEVELS)
    step = 1 << power
    chunks, acc0 = _fold_groups(y, step)
    groups1, acc1 = _fold_groups(chunks, step)
    groups2, acc2 = _fold_groups(groups1, step)
    acc3 = _fold(groups2)
    return ((acc0 + acc1) + acc2) + acc3


def _row_sum(x: jax.Array) -> jax.Array:
    """torch's ``row_sum``: 4 interleaved cascades, leftovers into the first, then combined."""
    rows = x.shape[0] // _ILP
    if rows:
        partial = _cascade(x[: rows * _ILP].reshape(rows, _ILP, *x.shape[1:]))
    else:
        partial = jnp.zeros((_ILP, *x.shape[1:]), x.dtype)
    acc = _fold(x[rows * _ILP :], partial[0])
    for k in range(1, _ILP):
        acc = acc + partial[k]
    return acc


def torch_sum(x: jax.Array) -> jax.Array:
    """fp32 sums over the last axis in exactly the order of torch's single-threaded CPU ``sum``.

    Leading axes are independent tensors (``[..., n] -> [...]``).

    Example:
        >>> torch_sum(jnp.arange(10, dtype=jnp.float32)).item()
        45.0
    """
    y = jnp.moveaxis(x.astype(jnp.float32), -1, 0)  # [n, ...]: the helpers reduce axis 0
    n, batch = y.shape[0], y.shape[1:]
    if n < _LANES:
        return _row_sum(y)
    vectors = n // _LANES
    lanes = _row_sum(y[: vectors * _LANES].reshape(vectors, _LANES, *batch))
    return _fold(lanes, _fold(y[vectors * _LANES :]))


def torch_mean(x: jax.Array) -> jax.Array:
    """``torch.mean`` over the last axis on CPU (single-threaded): :func:`torch_sum` / n.

    Example:
        >>> torch_mean(jnp.array([1.0, 2.0, 4.0])).item()
        2.3333332538604736
    """
    total = torch_sum(x)
    # XLA turns a division by a broadcast divisor (a batch of means over one n) into a
    # multiplication by its reciprocal; a divisor of the sums' own shape that comes out of
    # a barrier stays a true division.
    n = lax.optimization_barrier(jnp.full(total.shape, x.shape[-1], jnp.float32))
    return total / n


def _check_batch(shape: tuple[int, ...], batch_ndim: int) -> tuple[int, ...]:
    if not 0 <= batch_ndim < len(shape):
        raise ValueError(
            f"batch_ndim must be in [0, {len(shape)}) for absmax of shape {shape}, got {batch_ndim}"
        )
    return shape[:batch_ndim]


def _signed_map() -> jax.Array:
    return jnp.asarray(dynamic.dynamic_map(signed=True))


@functools.partial(jax.jit, static_argnames=("batch_ndim", "nested_blocksize"))
def double_quantize(
    absmax: jax.Array, batch_ndim: int = 0, nested_blocksize: int = NESTED_BLOCKSIZE
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Double-quantize fp32 ``absmax`` like bitsandbytes' ``compress_statistics=True``.

    The trailing ``absmax.ndim - batch_ndim`` axes of each batch index form one
    bitsandbytes tensor (flattened row-major); e.g. ``batch_ndim=1`` for the kernel-layout
    absmax ``[L, out, nb]`` of a layer-stacked kernel.

    Returns ``(codes uint8 [same shape], offset f32 [*batch], nested_absmax f32
    [*batch, ceil(m / nested_blocksize)])`` where ``m`` is the per-tensor absmax count.

    Example:
        >>> codes, offset, nested = double_quantize(jnp.linspace(0.5, 1.5, 300))
        >>> codes.dtype, offset.shape, nested.shape
        (dtype('uint8'), (), (2,))
    """
    batch = _check_batch(absmax.shape, batch_ndim)
    if absmax.dtype != jnp.float32:
        raise ValueError(f"absmax must be float32, got {absmax.dtype}")
    flat = absmax.reshape(math.prod(batch), -1)
    offset = torch_mean(flat)  # not under vmap: see torch_mean

    def one(centred: jax.Array) -> tuple[jax.Array, jax.Array]:
        return dynamic.quantize_blockwise(centred, _signed_map(), nested_blocksize)

    codes, nested = jax.vmap(one)(flat - offset[:, None])
    return codes.reshape(absmax.shape), offset.reshape(batch), nested.reshape(*batch, -1)


@functools.partial(jax.jit, static_argnames=("batch_ndim", "nested_blocksize"))
def double_dequantize(
    codes: jax.Array,
    offset: jax.Array,
    nested_absmax: jax.Array,
    batch_ndim: int = 0,
    nested_blocksize: int = NESTED_BLOCKSIZE,
) -> jax.Array:
    """Inverse of :func:`double_quantize`: fp32 absmax ``dyn[code] * nested[i // 256] + offset``.

    Example:
        >>> a = jnp.linspace(0.5, 1.5, 300)
        >>> back = double_dequantize(*double_quantize(a))
        >>> bool(jnp.max(jnp.abs(back - a)) < 1e-2)
        True
    """
    batch = _check_batch(codes.shape, batch_ndim)
    per_tensor = math.prod(codes.shape[batch_ndim:])
    nblocks = -(-per_tensor // nested_blocksize)
    if offset.shape != batch or nested_absmax.shape != (*batch, nblocks):
        raise ValueError(
            f"codes {codes.shape} (batch_ndim={batch_ndim}) need offset of shape {batch} and "
            f"nested_absmax of shape {(*batch, nblocks)}; got {offset.shape} and "
            f"{nested_absmax.shape}"
        )

    def one(c: jax.Array, off: jax.Array, nested: jax.Array) -> jax.Array:
        values = dynamic.dequantize_blockwise(
            c, nested, _signed_map(), nested_blocksize, (per_tensor,)
        )
        # XLA contracts ``product + offset`` into one FMA (one rounding); bitsandbytes rounds
        # the product first. A select that depends on each product blocks the contraction
        # (optimization barriers and no-op reduce_precision do not); it only maps inf to nan.
        return jnp.where(jnp.isfinite(values), values, jnp.nan) + off

    flat = jax.vmap(one)(
        codes.reshape(-1, per_tensor),
        offset.reshape(-1).astype(jnp.float32),
        nested_absmax.reshape(-1, nblocks).astype(jnp.float32),
    )
    return flat.reshape(codes.shape)


def bits_per_param(blocksize: int = 64, double_quant: bool = True) -> float:
    """Storage bits per parameter of a 4-bit tensor, ignoring partial blocks.

    ``4 + 32 / blocksize`` plain (4.5 at 64); with double quantization
    ``4 + 8 / blocksize + 32 / (blocksize * 256)`` (4.127 at 64).

    Example:
        >>> round(bits_per_param(64, double_quant=True), 3), bits_per_param(64, False)
        (4.127, 4.5)
    """
    check_blocksize(blocksize)
    if not double_quant:
        return 4 + 32 / blocksize
    return 4 + 8 / blocksize + 32 / (blocksize * NESTED_BLOCKSIZE)


def quantized_nbytes(shape: Sequence[int], blocksize: int = 64, double_quant: bool = True) -> int:
    """Exact bytes of one 4-bit tensor: packed data + absmax (+ DQ codes, scales, offset).

    The shared code tables (16 and 256 fp32 values) are not counted.

    Example:
        >>> quantized_nbytes((4096, 4096), 64, double_quant=True)
        8654852
    """
    check_blocksize(blocksize)
    n = math.prod(int(d) for d in shape)
    nblocks = -(-n // blocksize)
    packed = (n + 1) // 2
    if not double_quant:
        return packed + 4 * nblocks
    return packed + nblocks + 4 * -(-nblocks // NESTED_BLOCKSIZE) + 4
