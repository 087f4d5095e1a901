"""Optional places where a PEFT method's nodes enter the forward pass.

The model reads a few optional entries of the params tree and hands each to a
hook that dispatches on the node's type (the same pattern as
:func:`jpeft.models.linear.matmul`). Methods register implementations; the model
never imports them.

=====================  ==============================================  =====================
params entry           hook                                            used by
=====================  ==============================================  =====================
``prompt``             :func:`prompt_embeddings` -> ``[B, n, H]``      prompt tuning, P-tuning
``prefix``             :func:`prefix_key_values` -> 2x ``[L,B,n,K,D]`` prefix tuning, P-tuning v2
``layers.adapter_*``   :func:`adapter` -> ``h`` (sub-layer output)     bottleneck adapters
``adaption``           :func:`adaption_output` -> ``[B, T, H]``        LLaMA-Adapter
=====================  ==============================================  =====================
"""

from __future__ import annotations

import functools
from typing import Any

import jax

from jpeft.models.context import Context


def _unsupported(hook: str, node: Any) -> TypeError:
    return TypeError(f"{hook}: no implementation registered for {type(node).__name__}")


@functools.singledispatch
def prompt_embeddings(node: Any, batch_size: int, ctx: Context) -> jax.Array:
    """Virtual-token embeddings ``[B, n, hidden]`` prepended to the input embeddings."""
    raise _unsupported("prompt_embeddings", node)


@functools.singledispatch
def prefix_key_values(node: Any, batch_size: int, ctx: Context) -> tuple[jax.Array, jax.Array]:
    """Per-layer key and value prefixes, each ``[layers, B, n, kv_heads, head_dim]``."""
    raise _unsupported("prefix_key_values", node)


@functools.singledispatch
def adapter(node: Any, h: jax.Array, ctx: Context, name: str) -> jax.Array:
    """Transform a sub-layer's output ``h [B, T, hidden]`` before the residual add.

    ``name`` is ``"adapter_attn"`` (after self-attention) or ``"adapter_mlp"``.
    """
    raise _unsupported("adapter", node)


@functools.singledispatch
def adaption_output(node: Any, q: jax.Array, attn: dict[str, Any], ctx: Context) -> jax.Array:
    """LLaMA-Adapter: the gated prompt attention ``[B, T, hidden]`` added after ``o_proj``.

    ``q [B, T, heads, head_dim]`` are the layer's rotated queries and ``attn`` its
    projection params (the prompt goes through the layer's own k/v/o projections).
    The node's arrays carry a leading axis over the top ``n`` layers only.
    """
    raise _unsupported("adaption_output", node)
