"""Choosing the next token from logits: greedy, temperature, top-k and top-p (nucleus).

Filters follow transformers' order (temperature, then top-k, then top-p) and
keep every token tied with the last one kept. Everything is a pure function of
its inputs and an explicit ``jax.random`` key.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def greedy(logits: jax.Array) -> jax.Array:
    """The arg-max token of ``logits [..., vocab]`` (int32).

    Example:
        >>> greedy(jnp.array([[0.1, 2.0, -1.0]])).tolist()
        [1]
    """
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)


def top_k_filter(logits: jax.Array, k: int) -> jax.Array:
    """Set every logit below the ``k``-th largest of its row to ``-inf`` (``k <= 0``: no-op).

    Example:
        >>> top_k_filter(jnp.array([1.0, 3.0, 2.0]), 2).tolist()
        [-inf, 3.0, 2.0]
    """
    if k <= 0 or k >= logits.shape[-1]:
        return logits
    kth = jax.lax.top_k(logits, k)[0][..., -1:]
    return jnp.where(logits < kth, -jnp.inf, logits)


def top_p_filter(logits: jax.Array, top_p: jax.Array | float) -> jax.Array:
    """Nucleus filter: keep the smallest set of top tokens whose probability reaches ``top_p``.

    The most likely token is always kept, so a tiny ``top_p`` gives greedy decoding.

    Example:
        >>> top_p_filter(jnp.log(jnp.array([0.5, 0.3, 0.2])), 0.7).tolist()[2]
        -inf
    """
    sorted_logits = jnp.sort(logits, axis=-1)[..., ::-1]
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    before = jnp.cumsum(probs, axis=-1) - probs
    kept = before < top_p
    kept = kept.at[..., 0].set(True)
    cutoff = jnp.min(jnp.where(kept, sorted_logits, jnp.inf), axis=-1, keepdims=True)
    return jnp.where(logits < cutoff, -jnp.inf, logits)


def sample(
    key: jax.Array,
    logits: jax.Array,
    *,
    temperature: jax.Array | float = 1.0,
    top_p: jax.Array | float = 1.0,
    top_k: int = 0,
    use_top_p: bool = True,
) -> jax.Array:
    """Draw one token per row of ``logits [B, vocab]`` (int32 ``[B]``).

    Args:
        key: a ``jax.random`` key; the same key gives the same tokens.
        temperature: divides the logits (must be > 0; use :func:`greedy` for 0).
        top_p: nucleus mass in ``(0, 1]``.
        top_k: keep only the ``top_k`` largest logits (0: all). Static.
        use_top_p: static; False skips the sort that the nucleus filter needs.

    Example:
        >>> logits = jnp.array([[0.0, 5.0, 1.0]])
        >>> sample(jax.random.key(0), logits, top_p=0.01).tolist()
        [1]
    """
    scaled = logits.astype(jnp.float32) / temperature
    scaled = top_k_filter(scaled, top_k)
    if use_top_p:
        scaled = top_p_filter(scaled, top_p)
    return jax.random.categorical(key, scaled, axis=-1).astype(jnp.int32)
