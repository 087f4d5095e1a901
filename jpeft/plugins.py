"""The one place where jpeft's own plug-ins are registered with the model loader.

:mod:`jpeft.models` knows no PEFT method or quantization scheme; it exposes two tables,
quantizers (:func:`jpeft.models.hf.register_quantizer`) and pre-quantized checkpoint
formats (:func:`jpeft.models.packed.register_packed_format`). :func:`register_builtins`
fills them with jpeft's NF4 quantizer and the bitsandbytes 4-bit reader. ``import jpeft``
calls it, and so does every ``from jpeft.models import ...`` (Python imports the parent
package first), so ``hf.load_pretrained(path, quantize="nf4")`` needs no other import.

Example:
    >>> from jpeft.models import hf, packed
    >>> "nf4" in hf.QUANTIZERS and "bitsandbytes" in packed.PACKED_FORMATS
    True
"""

from __future__ import annotations

import jax

from jpeft.models.hf import register_quantizer
from jpeft.models.packed import register_packed_format
from jpeft.quant import QuantizedWeight, bnb_4bit_format, quantize


def quantize_nf4(kernel: jax.Array, module: str) -> QuantizedWeight:
    """``load_pretrained(..., quantize="nf4")``: NF4 with double quantization, blocksize 64
    (the QLoRA paper's recipe, and transformers' ``BitsAndBytesConfig`` defaults for it)."""
    return quantize(kernel, "nf4", blocksize=64, double_quant=True)


def register_builtins() -> None:
    """Register the ``"nf4"`` quantizer and the ``"bitsandbytes"`` packed format."""
    register_quantizer("nf4", quantize_nf4)
    register_packed_format("bitsandbytes", bnb_4bit_format)
