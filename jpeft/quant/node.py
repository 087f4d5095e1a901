"""NF4/FP4 weights as params-tree nodes, dequantized inside the jitted matmul.

A quantized kernel keeps bitsandbytes' blocks (64 consecutive ``in`` elements of
one output row) in the *kernel layout* ``packed [..., out, in // 2]``, which
shards like the base kernel; a layer-stacked kernel is quantized per layer, so
under the scanned forward only one layer is ever dequantized at a time.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jpeft.models.context import Context
from jpeft.nodes import Node, node
from jpeft.quant.double import double_dequantize, double_quantize
from jpeft.quant.fourbit import dequantize_kernel, quantize_kernel


@node(static=("quant_type", "blocksize"))
class QuantizedWeight(Node):
    """A 4-bit kernel ``[..., in, out]``; nothing in it is trainable.

    Attributes:
        packed: uint8 ``[..., out, in // 2]``, two codes a byte, high nibble first.
        absmax: fp32 ``[..., out, in // blocksize]``, or its uint8 codes when double-quantized.
        offset, nested: the double-quantization statistics per tensor (None without DQ).
    """

    packed: jax.Array
    absmax: jax.Array
    offset: jax.Array | None
    nested: jax.Array | None
    quant_type: str
    blocksize: int

    def scales(self) -> jax.Array:
        """The fp32 absmax per block (double-dequantized when needed)."""
        if self.offset is None:
            return self.absmax
        return double_dequantize(
            self.absmax, self.offset, self.nested, batch_ndim=self.absmax.ndim - 2
        )

    def dequantize(self, dtype: jnp.dtype = jnp.float32) -> jax.Array:
        """The kernel ``[..., in, out]`` in ``dtype``."""
        return dequantize_kernel(self.packed, self.scales(), self.quant_type, self.blocksize, dtype)

    def dense(self) -> jax.Array:
        return self.dequantize(jnp.float32)

    def matmul(self, x: jax.Array, ctx: Context, name: str) -> jax.Array:
        return jnp.matmul(x.astype(ctx.dtype), self.dequantize(ctx.dtype))

    def logical_axes(self, base: tuple[str | None, ...] | None):
        if base is None or len(base) != self.packed.ndim:
            return super().logical_axes(base)
        *lead, d_in, d_out = base
        stats = tuple(lead) if self.offset is not None else None
        return QuantizedWeight(
            packed=(*lead, d_out, d_in),
            absmax=(*lead, d_out, None),
            offset=stats,
            nested=None if stats is None else (*lead, None),
            quant_type=self.quant_type,
            blocksize=self.blocksize,
        )


def quantize(
    w: jax.Array, quant_type: str = "nf4", blocksize: int = 64, double_quant: bool = True
) -> QuantizedWeight:
    """Quantize a kernel ``[..., in, out]`` (each leading index is one bnb tensor).

    Example:
        >>> w4 = quantize(jnp.ones((128, 8)), "nf4", blocksize=64, double_quant=True)
        >>> dequantize(w4).shape
        (128, 8)
    """
    packed, absmax = quantize_kernel(w, quant_type, blocksize)
    offset = nested = None
    if double_quant:
        absmax, offset, nested = double_quantize(absmax, batch_ndim=absmax.ndim - 2)
    return QuantizedWeight(packed, absmax, offset, nested, quant_type, blocksize)


def dequantize(w: QuantizedWeight, dtype: jnp.dtype = jnp.float32) -> jax.Array:
    """The kernel a :class:`QuantizedWeight` stands for, in ``dtype``."""
    return w.dequantize(dtype)
