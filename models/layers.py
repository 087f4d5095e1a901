"""One LLaMA decoder layer: RMSNorm, GQA self-attention with RoPE, SwiGLU MLP.

Every projection goes through :func:`jpeft.models.linear.linear`; optional PEFT nodes
enter through :mod:`jpeft.models.hooks`.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from jpeft.models import hooks
from jpeft.models.attention import Mask, attend, cached_attention
from jpeft.models.cache import write_layer
from jpeft.models.config import LlamaConfig
from jpeft.models.context import Context
from jpeft.models.linear import dense, linear
from jpeft.models.pytree import Params
from jpeft.models.rope import apply_rotary


def rms_norm(scale: Any, x: jax.Array, eps: float, dtype: jnp.dtype) -> jax.Array:
    """HF's LlamaRMSNorm: normalize in fp32, cast, then multiply by the scale."""
    x32 = x.astype(jnp.float32)
    normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return dense(scale).astype(dtype) * normed.astype(dtype)


def mlp(p: Params, x: jax.Array, ctx: Context) -> jax.Array:
    """SwiGLU: ``down(silu(gate(x)) * up(x))``."""
    gate = linear(p["gate_proj"], x, ctx, "gate_proj")
    up = linear(p["up_proj"], x, ctx, "up_proj")
    return linear(p["down_proj"], jax.nn.silu(gate) * up, ctx, "down_proj")


def self_attention(
    p: Params,
    x: jax.Array,
    rope: tuple[jax.Array, jax.Array],
    mask: Mask,
    cfg: LlamaConfig,
    ctx: Context,
    kv: dict[str, Any],
    attention_impl: str,
) -> tuple[jax.Array, tuple[jax.Array, jax.Array] | None]:
    """GQA self-attention for ``x [B, T, hidden]`` (:func:`jpeft.models.attention.attend`,
    or :func:`jpeft.models.attention.cached_attention` with a cache).

    ``mask`` is a :class:`jpeft.models.attention.CausalMask`, or a boolean ``[B, T, S]``
    array when decoding. ``kv`` carries this layer's optional extras:
    ``cache`` (decoding: the stacked keys and values ``[L, B, K, S, D]`` of every
    layer), with this layer's index ``layer`` and the write position ``length``,
    ``prefix_k/prefix_v`` (keys/values every query sees), and ``nodes`` (this layer's
    slice of every ``per_layer`` PEFT node, each asked for its
    :func:`jpeft.models.hooks.adaption_output`). Returns the output and the updated
    stacked ``(keys, values)`` (:func:`jpeft.models.cache.write_layer`), or None
    without a cache.
    """
    b, t, _ = x.shape
    heads, kv_heads, d = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    q = linear(p["q_proj"], x, ctx, "q_proj").reshape(b, t, heads, d)
    k = linear(p["k_proj"], x, ctx, "k_proj").reshape(b, t, kv_heads, d)
    v = linear(p["v_proj"], x, ctx, "v_proj").reshape(b, t, kv_heads, d)
    queries = q  # before RoPE, for the nodes' adaption outputs
    q, k = apply_rotary(q, *rope), apply_rotary(k, *rope)

    cache = None
    prefix = (kv["prefix_k"], kv["prefix_v"]) if "prefix_k" in kv else None
    if "cache" in kv:
        (cache_k, cache_v), layer, length = kv["cache"], kv["layer"], kv["length"]
        cache_k, k = write_layer(cache_k, layer, length, k)
        cache_v, v = write_layer(cache_v, layer, length, v)
        cache = (cache_k, cache_v)
        k, v = k.astype(ctx.dtype), v.astype(ctx.dtype)
        out = cached_attention(q, k, v, mask, prefix=prefix)
    else:
        out = attend(q, k, v, mask, prefix=prefix, implementation=attention_impl)
    out = linear(p["o_proj"], out.reshape(b, t, heads * d), ctx, "o_proj")
    for layer_node in kv.get("nodes", {}).values():
        added = hooks.adaption_output(layer_node, queries, rope, p, ctx)
        if added is not None:
            out = out + added.astype(out.dtype)
    return out, cache


def decoder_layer(
    p: Params,
    x: jax.Array,
    rope: tuple[jax.Array, jax.Array],
    mask: Mask,
    cfg: LlamaConfig,
    ctx: Context,
    kv: dict[str, Any],
    attention_impl: str,
) -> tuple[jax.Array, tuple[jax.Array, jax.Array] | None]:
    """Pre-norm residual block; adapters (when present) act on each sub-layer's output."""
    h = rms_norm(p["input_layernorm"]["scale"], x, cfg.rms_norm_eps, ctx.dtype)
    h, cache = self_attention(p["self_attn"], h, rope, mask, cfg, ctx, kv, attention_impl)
    if "adapter_attn" in p:
        h = hooks.adapter_output(p["adapter_attn"], h, ctx, "adapter_attn")
    x = x + h
    h = rms_norm(p["post_attention_layernorm"]["scale"], x, cfg.rms_norm_eps, ctx.dtype)
    h = mlp(p["mlp"], h, ctx)
    if "adapter_mlp" in p:
        h = hooks.adapter_output(p["adapter_mlp"], h, ctx, "adapter_mlp")
    return x + h, cache
