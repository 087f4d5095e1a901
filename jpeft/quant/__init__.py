"""bitsandbytes-compatible quantization: 4-bit NF4/FP4, double quantization, 8-bit dynamic.

:mod:`jpeft.plugins` registers ``load_pretrained(..., quantize="nf4")`` and the reader of
pre-quantized bitsandbytes 4-bit checkpoints with the model loader.
"""

from jpeft.quant.bnb_checkpoint import Bnb4bitFormat, bnb_4bit_format
from jpeft.quant.double import (
    NESTED_BLOCKSIZE,
    bits_per_param,
    double_dequantize,
    double_quantize,
    quantized_nbytes,
    torch_mean,
    torch_sum,
)
from jpeft.quant.dynamic import dequantize_blockwise, dynamic_map, quantize_blockwise
from jpeft.quant.fourbit import (
    BLOCKSIZES,
    FP4_TABLE,
    NF4_TABLE,
    QUANT_TYPES,
    check_blocksize,
    check_quant_type,
    code_table,
    decode_table,
    dequantize_4bit,
    encode,
    pack,
    quantize_4bit,
    unpack,
)
from jpeft.quant.layout import (
    dequantize_flat,
    dequantize_kernel,
    fits_kernel_layout,
    flat_to_kernel,
    kernel_to_flat,
    quantize_flat,
    quantize_kernel,
)
from jpeft.quant.node import QuantizedWeight, dequantize, quantize, with_implementation

__all__ = [
    "BLOCKSIZES",
    "FP4_TABLE",
    "NESTED_BLOCKSIZE",
    "NF4_TABLE",
    "QUANT_TYPES",
    "Bnb4bitFormat",
    "QuantizedWeight",
    "bits_per_param",
    "bnb_4bit_format",
    "check_blocksize",
    "check_quant_type",
    "code_table",
    "decode_table",
    "dequantize",
    "dequantize_4bit",
    "dequantize_blockwise",
    "dequantize_flat",
    "dequantize_kernel",
    "double_dequantize",
    "double_quantize",
    "dynamic_map",
    "encode",
    "fits_kernel_layout",
    "flat_to_kernel",
    "kernel_to_flat",
    "pack",
    "quantize",
    "quantize_4bit",
    "quantize_blockwise",
    "quantize_flat",
    "quantize_kernel",
    "quantized_nbytes",
    "torch_mean",
    "torch_sum",
    "unpack",
    "with_implementation",
]
