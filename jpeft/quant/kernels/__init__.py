"""Fused 4-bit (NF4/FP4) dequant-matmul kernels in Pallas (GPU, Triton backend).

* :mod:`~jpeft.quant.kernels.tiles`: the in-kernel dequantization every kernel shares;
* :mod:`~jpeft.quant.kernels.decode`: few rows (decoding), split-K;
* :mod:`~jpeft.quant.kernels.gemm`: many rows (training), dequantization in the prologue;
* :mod:`~jpeft.quant.kernels.vjp`: the input gradient ``dy @ W^T``;
* :mod:`~jpeft.quant.kernels.op`: the differentiable matmul that picks them on CUDA.
"""

from jpeft.quant.kernels.decode import decode
from jpeft.quant.kernels.gemm import gemm
from jpeft.quant.kernels.op import IMPLEMENTATIONS, check_implementation, kernels_take, matmul
from jpeft.quant.kernels.vjp import input_grad

__all__ = [
    "IMPLEMENTATIONS",
    "check_implementation",
    "decode",
    "gemm",
    "input_grad",
    "kernels_take",
    "matmul",
]
