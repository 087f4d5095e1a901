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

from jpeft.models.hf import register_quantizer
from jpeft.models.packed import register_packed_format
from jpeft.qlora import QLoRA
from jpeft.quant import bnb_4bit_format


def register_builtins() -> None:
    """Register the ``"nf4"`` quantizer (:class:`jpeft.QLoRA`'s default settings: NF4,
    blocksize 64, double quantization) and the ``"bitsandbytes"`` packed format."""
    register_quantizer("nf4", QLoRA().quantize)
    register_packed_format("bitsandbytes", bnb_4bit_format)
