"""NF4/FP4 weights as params-tree nodes, dequantized inside the jitted matmul.

A quantized kernel ``[..., in, out]`` holds bitsandbytes' bits in the kernel layout
(``in % blocksize == 0``: arrays ``[..., out, ...]`` that shard like the base kernel)
or, for any other width, in bitsandbytes' flat layout (:mod:`jpeft.quant.layout`). A
layer-stacked kernel is quantized per layer. Its matmul is
:func:`jpeft.quant.kernels.matmul`: on CUDA, fused Pallas kernels read the 4-bit weight
where it lies; elsewhere XLA dequantizes one layer at a time under the scanned forward.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from jpeft.models.context import Context
from jpeft.nodes import Node, node
from jpeft.quant import kernels
from jpeft.quant.double import double_dequantize, double_quantize
from jpeft.quant.layout import (
    dequantize_flat,
    dequantize_kernel,
    fits_kernel_layout,
    quantize_flat,
    quantize_kernel,
)


@node(static=("quant_type", "blocksize", "in_features", "out_features", "implementation"))
class QuantizedWeight(Node):
    """A 4-bit kernel ``[..., in_features, out_features]``; nothing in it is trainable.

    Field names follow bitsandbytes' ``QuantState`` (``absmax``, ``offset`` and ``state2``'s
    ``absmax`` become ``absmax``, ``nested_offset`` and ``nested_absmax``, as its serialized
    keys name them). Exactly one of ``absmax`` and ``quantized_absmax`` is set.

    Attributes:
        packed: uint8 codes, two a byte, high nibble first: ``[..., out, in // 2]`` in the
            kernel layout, ``[..., (out * in + 1) // 2]`` in the flat one.
        absmax: fp32 scale of each block, ``[..., out, in // blocksize]`` (kernel layout)
            or ``[..., ceil(out * in / blocksize)]`` (flat); None when double-quantized.
        quantized_absmax: with double quantization, uint8 codes (same shape as ``absmax``)
            of ``absmax - nested_offset`` in bitsandbytes' signed 8-bit dynamic map
            (``weight.absmax`` in a bitsandbytes checkpoint); else None.
        nested_absmax: fp32 ``[..., ceil(nb / 256)]``, one scale per 256 absmax codes
            (``nb`` blocks per layer); None without double quantization.
        nested_offset: fp32 ``[...]``, the mean absmax subtracted before double
            quantization; None without it.
        quant_type: ``"nf4"`` or ``"fp4"``.
        blocksize: values per absmax block (32..4096).
        in_features, out_features: one layer's kernel shape ``(in, out)``.
        implementation: how it multiplies (:func:`jpeft.quant.kernels.matmul`): None for
            the fused kernels on CUDA and XLA elsewhere, ``"xla"`` or ``"interpret"``
            (the kernels in Pallas interpret mode, for tests); see :func:`with_implementation`.

    Example:
        >>> w4 = quantize(jnp.ones((72, 8)), "nf4", blocksize=64, double_quant=True)
        >>> w4.layout, w4.packed.shape, w4.quantized_absmax.shape, w4.absmax is None
        ('flat', (288,), (9,), True)
    """

    packed: jax.Array
    absmax: jax.Array | None
    quantized_absmax: jax.Array | None
    nested_absmax: jax.Array | None
    nested_offset: jax.Array | None
    quant_type: str
    blocksize: int
    in_features: int
    out_features: int
    implementation: str | None = None

    @property
    def double_quant(self) -> bool:
        """Whether the absmax is double-quantized (QLoRA's "DQ")."""
        return self.quantized_absmax is not None

    @property
    def layout(self) -> str:
        """``"kernel"`` when ``in_features % blocksize == 0``, else ``"flat"``."""
        return "kernel" if fits_kernel_layout(self.in_features, self.blocksize) else "flat"

    def block_absmax(self) -> jax.Array:
        """The fp32 absmax of every block (double-dequantized when stored as codes)."""
        if not self.double_quant:
            return self.absmax
        codes = self.quantized_absmax
        return double_dequantize(
            codes, self.nested_offset, self.nested_absmax, batch_ndim=self.nested_offset.ndim
        )

    def dequantize(self, dtype: jnp.dtype = jnp.float32) -> jax.Array:
        """The kernel ``[..., in, out]`` in ``dtype``."""
        args = (self.packed, self.block_absmax())
        if self.layout == "kernel":
            return dequantize_kernel(*args, self.quant_type, self.blocksize, dtype)
        shape = (self.in_features, self.out_features)
        return dequantize_flat(*args, shape, self.quant_type, self.blocksize, dtype)

    def dense(self) -> jax.Array:
        return self.dequantize(jnp.float32)

    def unloaded(self) -> QuantizedWeight:
        """Itself: a quantized weight is the base (:func:`jpeft.unload` keeps it)."""
        return self

    def matmul(self, x: jax.Array, ctx: Context, name: str) -> jax.Array:
        """``x @ W`` through :func:`jpeft.quant.kernels.matmul` (fused kernels on CUDA)."""
        return kernels.matmul(x.astype(ctx.dtype), self)

    def logical_axes(self, base: tuple[str | None, ...] | None):
        """The kernel layout follows the base (``packed`` and absmax ``[..., out, in]``);
        the flat layout keeps only the leading (layer) axes."""
        if base is None or len(base) != len(self.packed.shape) + (self.layout == "flat"):
            return super().logical_axes(base)
        *lead, d_in, d_out = base
        rows = (*lead, d_out, d_in) if self.layout == "kernel" else (*lead, None)
        blocks = (*rows[:-1], None)
        return QuantizedWeight(
            packed=rows,
            absmax=None if self.double_quant else blocks,
            quantized_absmax=blocks if self.double_quant else None,
            nested_absmax=(*lead, None) if self.double_quant else None,
            nested_offset=tuple(lead) if self.double_quant else None,
            quant_type=self.quant_type,
            blocksize=self.blocksize,
            in_features=self.in_features,
            out_features=self.out_features,
            implementation=self.implementation,
        )


def quantize(
    w: jax.Array, quant_type: str = "nf4", blocksize: int = 64, double_quant: bool = True
) -> QuantizedWeight:
    """Quantize a kernel ``[..., in, out]`` (each leading index is one bnb tensor), any width.

    Bit-exact with ``bitsandbytes.functional.quantize_4bit(w[i].T, blocksize=blocksize,
    quant_type=quant_type, compress_statistics=double_quant)`` for every leading index.

    Raises:
        ValueError: an unknown ``quant_type``, a blocksize bitsandbytes refuses, a
            non-float ``w`` or one with fewer than 2 axes.

    Example:
        >>> w4 = quantize(jnp.ones((128, 8)), "nf4", blocksize=64, double_quant=True)
        >>> dequantize(w4).shape, w4.layout
        ((128, 8), 'kernel')
    """
    if w.ndim < 2:
        raise ValueError(f"quantize needs a kernel [..., in, out], got shape {w.shape}")
    d_in, d_out = w.shape[-2:]
    if fits_kernel_layout(d_in, blocksize):
        packed, absmax = quantize_kernel(w, quant_type, blocksize)
    else:
        packed, absmax = quantize_flat(w, quant_type, blocksize)
    codes = nested = offset = None
    if double_quant:
        codes, offset, nested = double_quantize(absmax, batch_ndim=w.ndim - 2)
        absmax = None
    return QuantizedWeight(
        packed=packed,
        absmax=absmax,
        quantized_absmax=codes,
        nested_absmax=nested,
        nested_offset=offset,
        quant_type=quant_type,
        blocksize=blocksize,
        in_features=d_in,
        out_features=d_out,
    )


def dequantize(w: QuantizedWeight, dtype: jnp.dtype = jnp.float32) -> jax.Array:
    """The kernel a :class:`QuantizedWeight` stands for, ``[..., in, out]`` in ``dtype``.

    Example:
        >>> dequantize(quantize(jnp.ones((64, 2)), "fp4", 64, double_quant=False)).sum().item()
        128.0
    """
    return w.dequantize(dtype)


def with_implementation(tree: Any, implementation: str | None) -> Any:
    """``tree`` (a params tree or one node) with every :class:`QuantizedWeight` set to
    multiply with ``implementation`` (one of :data:`jpeft.quant.kernels.IMPLEMENTATIONS`).

    Raises:
        ValueError: an unknown ``implementation``.

    Example:
        >>> w4 = with_implementation({"w": quantize(jnp.ones((64, 16)))}, "xla")["w"]
        >>> w4.implementation
        'xla'
    """
    kernels.check_implementation(implementation)
    return jax.tree.map(
        lambda w: (
            dataclasses.replace(w, implementation=implementation)
            if isinstance(w, QuantizedWeight)
            else w
        ),
        tree,
        is_leaf=lambda x: isinstance(x, QuantizedWeight),
    )
