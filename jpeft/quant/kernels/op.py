"""The 4-bit matmul behind :func:`jpeft.models.linear.matmul`: fused kernels on CUDA, XLA elsewhere.

:func:`matmul` is what a :class:`~jpeft.quant.QuantizedWeight` projection computes. Its
primal and its VJP are each a :func:`jax.lax.platform_dependent` choice, resolved when the
program is lowered (so a CPU-side compile for an H100 target gets the kernels):

* CUDA: :func:`~jpeft.quant.kernels.decode.decode` for ``M <= 64`` rows,
  :func:`~jpeft.quant.kernels.gemm.gemm` above, and
  :func:`~jpeft.quant.kernels.vjp.input_grad` for ``dx = dy @ W^T``: no 16-bit weight is
  materialised in either pass. Under a device mesh each shard runs its own kernel call
  (:mod:`~jpeft.quant.kernels.sharded`).
* elsewhere: XLA's dequantize-then-dot, in both passes.

The weight is a frozen constant: its cotangent is zero (bitsandbytes' ``MatMul4Bit`` gives
the 4-bit weight no gradient either; :func:`jpeft.split` never asks for one). Weights
the kernels do not take (the flat layout, ``out_features`` not a multiple of 16, a
weight with leading axes, an integer ``x``) use plain XLA with ordinary autodiff.

The weight's static ``implementation`` field (:data:`IMPLEMENTATIONS`) overrides the
choice: ``"xla"`` everywhere, or ``"interpret"``: the Pallas kernels in interpret mode on
any backend (how CPU tests run them). Being static, it is part of every jit cache key.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jpeft.quant.kernels import sharded
from jpeft.quant.kernels.tiles import MIN_TILE, code_tables

if TYPE_CHECKING:
    from jpeft.quant.node import QuantizedWeight

IMPLEMENTATIONS = (None, "xla", "interpret")
_KERNEL_DTYPES = (np.dtype(jnp.bfloat16), np.dtype(jnp.float16), np.dtype(jnp.float32))


def check_implementation(implementation: str | None) -> str | None:
    """Return ``implementation`` if it is one of :data:`IMPLEMENTATIONS`, else raise ValueError.

    Example:
        >>> check_implementation("xla")
        'xla'
    """
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(
            f"implementation must be one of {IMPLEMENTATIONS} (None: the kernels on CUDA, "
            f"XLA elsewhere), got {implementation!r}"
        )
    return implementation


def kernels_take(w: QuantizedWeight, dtype: jnp.dtype) -> bool:
    """Whether the fused kernels handle ``w`` for inputs of ``dtype`` (see the module docstring).

    Example:
        >>> from jpeft import quant
        >>> kernels_take(quant.quantize(jnp.ones((64, 16)), "nf4", 64), jnp.bfloat16)
        True
    """
    return (
        w.layout == "kernel"
        and w.packed.ndim == 2
        and w.out_features % MIN_TILE == 0
        and np.dtype(dtype) in _KERNEL_DTYPES
    )


def matmul(x: jax.Array, w: QuantizedWeight) -> jax.Array:
    """``x @ W`` for ``x [..., in]`` and a 4-bit kernel ``W [in, out]``: ``[..., out]``, x's dtype.

    Example:
        >>> from jpeft import quant
        >>> w4 = quant.quantize(jnp.ones((64, 16)), "nf4", 64)
        >>> matmul(jnp.ones((2, 3, 64)), w4).shape
        (2, 3, 16)
    """
    if check_implementation(w.implementation) == "xla" or not kernels_take(w, x.dtype):
        return jnp.matmul(x, w.dequantize(x.dtype))
    rows = x.reshape(-1, x.shape[-1])
    return _matmul(rows, w).reshape(*x.shape[:-1], w.out_features)


def _xla_product(x: jax.Array, w: QuantizedWeight) -> jax.Array:
    return x @ w.dequantize(x.dtype)


def _xla_input_grad(dy: jax.Array, w: QuantizedWeight) -> jax.Array:
    return dy @ w.dequantize(dy.dtype).T


def _dispatch(kernel, xla, a: jax.Array, w: QuantizedWeight) -> jax.Array:
    """``kernel`` on CUDA, ``xla`` elsewhere; ``kernel`` interpreted if the weight asks."""
    tables = tuple(jnp.asarray(t) for t in code_tables(w))
    if w.implementation == "interpret":
        return kernel(a, w, tables, True)
    return lax.platform_dependent(a, w, default=xla, cuda=lambda a, w: kernel(a, w, tables, False))


@jax.custom_vjp
def _matmul(x: jax.Array, w: QuantizedWeight) -> jax.Array:
    return _dispatch(sharded.product, _xla_product, x, w)


def _matmul_fwd(x: jax.Array, w: QuantizedWeight) -> tuple[jax.Array, QuantizedWeight]:
    return _matmul(x, w), w


def _matmul_bwd(w: QuantizedWeight, dy: jax.Array) -> tuple[jax.Array, None]:
    return _dispatch(sharded.input_gradient, _xla_input_grad, dy, w), None


_matmul.defvjp(_matmul_fwd, _matmul_bwd)
