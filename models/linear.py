"""The one matmul entry point every projection goes through.

A projection's ``kernel`` is a *weight node*: a plain ``[in, out]`` array, or
any pytree node a PEFT method put there (a LoRA wrapper, a packed NF4 weight,
...). :func:`matmul` and :func:`dense` dispatch on the node's type: a
:class:`jpeft.models.hooks.ParamNode` declares both as methods on its class, so the
model code never changes when a method is added::

    class MyWeight(jpeft.Node):
        def matmul(self, x, ctx, name): ...
        def dense(self): ...

Other types may register implementations (``@matmul.register(T)``).
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from jpeft.models.context import Context
from jpeft.models.hooks import ParamNode


@functools.singledispatch
def matmul(w: Any, x: jax.Array, ctx: Context, name: str) -> jax.Array:
    """``x @ w`` for a weight node ``w`` with logical shape ``[in, out]``.

    ``name`` is the HF module name (``"q_proj"``...), used for dropout streams.

    Example:
        >>> y = matmul(jnp.ones((4, 3)), jnp.ones((2, 4)), Context(), "q_proj")
        >>> y.shape
        (2, 3)
    """
    return jnp.matmul(x.astype(ctx.dtype), jnp.asarray(w).astype(ctx.dtype))


@functools.singledispatch
def dense(w: Any) -> jax.Array:
    """The plain array a weight node stands for (e.g. base + LoRA delta, dequantized NF4).

    Example:
        >>> dense(jnp.eye(2)).shape
        (2, 2)
    """
    return jnp.asarray(w)


@functools.singledispatch
def lookup(w: Any, ids: jax.Array, ctx: Context) -> jax.Array:
    """Rows ``ids [...]`` of an embedding table node ``w [vocab, hidden]``: ``[..., hidden]``.

    Example:
        >>> lookup(jnp.eye(3), jnp.array([2, 0]), Context()).tolist()
        [[0.0, 0.0, 1.0], [1.0, 0.0, 0.0]]
    """
    return jnp.asarray(w)[ids]


@functools.singledispatch
def tied_output(w: Any) -> jax.Array:
    """The ``[vocab, hidden]`` table a tied ``lm_head`` uses, for embedding table node ``w``.

    Example:
        >>> tied_output(jnp.eye(2)).shape
        (2, 2)
    """
    return jnp.asarray(w)


@lookup.register(ParamNode)
def _lookup_node(w: ParamNode, ids: jax.Array, ctx: Context) -> jax.Array:
    return w.lookup(ids, ctx)


@tied_output.register(ParamNode)
def _tied_output_node(w: ParamNode) -> jax.Array:
    return w.tied_output()


@matmul.register(ParamNode)
def _matmul_node(w: ParamNode, x: jax.Array, ctx: Context, name: str) -> jax.Array:
    return w.matmul(x, ctx, name)


@dense.register(ParamNode)
def _dense_node(w: ParamNode) -> jax.Array:
    return w.dense()


def linear(p: dict[str, Any], x: jax.Array, ctx: Context, name: str) -> jax.Array:
    """An HF ``nn.Linear``: ``p`` holds ``kernel`` (a weight node) and optionally ``bias``.

    The output carries ``name`` for remat policies (``jax.ad_checkpoint.checkpoint_name``).
    """
    y = matmul(p["kernel"], x, ctx, name)
    if "bias" in p:
        y = y + dense(p["bias"]).astype(y.dtype)
    return checkpoint_name(y, name)
