"""Rotary position embeddings with HF's scaling variants (linear, dynamic NTK, llama3)."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from jpeft.models.config import LlamaConfig


def inverse_frequencies(cfg: LlamaConfig, seq_len: jax.Array | int | None = None) -> jax.Array:
    """The ``[head_dim // 2]`` inverse frequencies, scaled as ``cfg.rope_scaling`` says.

    ``seq_len`` (max position + 1 of the call) only matters for ``dynamic`` scaling.

    Example:
        >>> cfg = LlamaConfig(vocab_size=8, hidden_size=16, intermediate_size=8,
        ...                   num_hidden_layers=1, num_attention_heads=2)
        >>> inverse_frequencies(cfg).shape
        (4,)
    """
    dim = cfg.head_dim
    scaling = cfg.rope_scaling
    exponents = jnp.arange(0, dim, 2, dtype=jnp.float32) / dim
    inv_freq = 1.0 / (cfg.rope_theta**exponents)
    if scaling.rope_type == "linear":
        return inv_freq / scaling.factor
    if scaling.rope_type == "dynamic":
        return _dynamic_ntk(cfg, exponents, inv_freq, seq_len)
    if scaling.rope_type == "llama3":
        return _llama3(cfg, inv_freq)
    return inv_freq


def _dynamic_ntk(cfg: LlamaConfig, exponents, inv_freq, seq_len) -> jax.Array:
    scaling = cfg.rope_scaling
    original = scaling.original_max_position_embeddings or cfg.max_position_embeddings
    if seq_len is None:
        return inv_freq
    seq_len = jnp.asarray(seq_len, jnp.float32)
    dim = cfg.head_dim
    base = cfg.rope_theta * ((scaling.factor * seq_len / original) - (scaling.factor - 1)) ** (
        dim / (dim - 2)
    )
    scaled = 1.0 / (base**exponents)
    return jnp.where(seq_len > original, scaled, inv_freq)


def _llama3(cfg: LlamaConfig, inv_freq: jax.Array) -> jax.Array:
    s = cfg.rope_scaling
    old_context = s.original_max_position_embeddings or cfg.max_position_embeddings
    low_freq_wavelen = old_context / s.low_freq_factor
    high_freq_wavelen = old_context / s.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = jnp.where(wavelen > low_freq_wavelen, inv_freq / s.factor, inv_freq)
    smooth = (old_context / wavelen - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor)
    smoothed = (1 - smooth) * scaled / s.factor + smooth * scaled
    medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
    return jnp.where(medium, smoothed, scaled)


def rotary_tables(cfg: LlamaConfig, positions: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``cos, sin`` of shape ``[B, T, head_dim]`` (fp32) for int ``positions [B, T]``."""
    inv_freq = inverse_frequencies(cfg, jnp.max(positions) + 1)
    freqs = positions.astype(jnp.float32)[..., None] * inv_freq
    angles = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(angles), jnp.sin(angles)


def apply_rotary(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotate ``x [B, T, heads, head_dim]`` (HF's rotate-half convention)."""
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    cos = cos[:, :, None, :].astype(x.dtype)
    sin = sin[:, :, None, :].astype(x.dtype)
    return x * cos + rotated * sin


def apply_rotary_apart(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """:func:`apply_rotary`'s values, written as ``x cos + rotate_half(x sin)``.

    Equal products (``sin`` repeats across the two halves, and negation is exact), but
    a different program: where a PEFT node needs the rotated queries besides attention
    (LLaMA-Adapter), XLA cannot merge the two rotations into one shared fusion, which
    would change how the attention's own is compiled (rounding 3e-8 away from the base
    model's logits instead of bit for bit).

    Example:
        >>> x = jax.random.normal(jax.random.key(0), (1, 3, 2, 4))
        >>> cos, sin = jnp.cos(jnp.ones((1, 3, 4))), jnp.sin(jnp.ones((1, 3, 4)))
        >>> bool(jnp.allclose(apply_rotary_apart(x, cos, sin), apply_rotary(x, cos, sin)))
        True
    """
    half = x.shape[-1] // 2
    scaled = x * sin[:, :, None, :].astype(x.dtype)
    rotated = jnp.concatenate([-scaled[..., half:], scaled[..., :half]], axis=-1)
    return x * cos[:, :, None, :].astype(x.dtype) + rotated
