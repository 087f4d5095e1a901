"""Next-token cross-entropy, from logits or chunk by chunk from the final hidden states.

:func:`chunked_token_loss` never holds the fp32 ``[B, T, vocab]`` logits (7 GB of
temporaries at Llama-3's vocab of 128,256 for 4 x 2048 tokens): a ``lax.scan`` over
sequence chunks computes each chunk's logits, log-sum-exp and target logit, and
``jax.checkpoint`` makes the backward pass recompute the chunk's logits instead of
saving them. Loss and gradients equal :func:`token_loss` on the full logits.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax

# Bytes of fp32 logits per chunk when the chunk size is left to :func:`chunk_size`.
CHUNK_BYTES = 256 * 2**20

Head = Callable[[jax.Array, jax.Array], jax.Array]


def target_weights(
    loss_mask: jax.Array,
    attention_mask: jax.Array | None = None,
    segment_ids: jax.Array | None = None,
) -> jax.Array:
    """fp32 ``[B, T - 1]``: 1 where the logits at ``t`` are scored on token ``t + 1``.

    Token ``t + 1`` is a target when ``loss_mask[t + 1] == 1``, it is not padding
    (``attention_mask[t + 1] == 1``) and, in a packed row, it is in the same segment as
    token ``t``.

    Example:
        >>> target_weights(jnp.array([[0, 1, 1]]), segment_ids=jnp.array([[1, 1, 2]])).tolist()
        [[1.0, 0.0]]
    """
    weights = loss_mask[:, 1:].astype(jnp.float32)
    if attention_mask is not None:
        weights = weights * (attention_mask[:, 1:] > 0)
    if segment_ids is not None:
        weights = weights * (segment_ids[:, 1:] == segment_ids[:, :-1])
    return weights


def token_loss(
    logits: jax.Array,
    input_ids: jax.Array,
    loss_mask: jax.Array,
    attention_mask: jax.Array | None = None,
    segment_ids: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array]:
    """``(sum of fp32 cross-entropy over targets, number of targets)`` from ``[B, T, V]`` logits.

    The logits at ``t - 1`` predict token ``t``; targets as in :func:`target_weights`.

    Example:
        >>> logits = jnp.zeros((1, 3, 4))
        >>> ids, lm = jnp.array([[0, 1, 2]]), jnp.array([[0, 1, 1]])
        >>> total, n = token_loss(logits, ids, lm)
        >>> round(float(total / n), 4), int(n)
        (1.3863, 2)
    """
    weights = target_weights(loss_mask, attention_mask, segment_ids)
    ce = optax.softmax_cross_entropy_with_integer_labels(
        logits[:, :-1].astype(jnp.float32), input_ids[:, 1:]
    )
    return jnp.sum(ce * weights), jnp.sum(weights)


def chunk_size(batch_size: int, vocab_size: int, budget: int = CHUNK_BYTES) -> int:
    """Sequence positions per chunk: the largest power of two whose fp32 logits
    ``[B, chunk, vocab]`` fit ``budget`` bytes (at least 1).

    Example:
        >>> chunk_size(4, 128_256), chunk_size(4, 32_000), chunk_size(1, 128_256)
        (128, 512, 512)
    """
    positions = max(1, budget // (4 * batch_size * vocab_size))
    return 1 << (positions.bit_length() - 1)


def chunked_token_loss(
    hidden: jax.Array,
    head: Head,
    input_ids: jax.Array,
    loss_mask: jax.Array,
    attention_mask: jax.Array | None = None,
    segment_ids: jax.Array | None = None,
    *,
    chunk: int | None = None,
) -> tuple[jax.Array, jax.Array]:
    """:func:`token_loss` of ``head(hidden)`` without materialising all the logits.

    Args:
        hidden: ``[B, T, hidden]`` final normed hidden states
            (``Llama(...).apply(..., return_hidden=True)``).
        head: ``head(h [B, C, hidden], index) -> logits [B, C, vocab]`` for chunk number
            ``index`` (an int32 scalar, e.g. to fold into a dropout key).
        input_ids, loss_mask, attention_mask, segment_ids: ``[B, T]``, as in
            :func:`token_loss`.
        chunk: sequence positions per chunk (default :func:`chunk_size`); ``T`` is
            padded up to a multiple of it with weightless positions.

    Returns:
        ``(sum of fp32 cross-entropy over targets, number of targets)``.

    Example:
        >>> w = jnp.arange(12.0).reshape(3, 4) / 10
        >>> hidden = jnp.ones((2, 5, 3)); ids = jnp.ones((2, 5), jnp.int32)
        >>> chunked = chunked_token_loss(hidden, lambda h, i: h @ w, ids, ids, chunk=2)
        >>> full = token_loss(hidden @ w, ids, ids)
        >>> bool(jnp.allclose(chunked[0], full[0])), int(chunked[1])
        (True, 8)
    """
    b, t, _ = hidden.shape
    weights = jnp.pad(target_weights(loss_mask, attention_mask, segment_ids), ((0, 0), (0, 1)))
    targets = jnp.pad(input_ids[:, 1:], ((0, 0), (0, 1)))
    if chunk is None:
        vocab = jax.eval_shape(head, hidden[:, :1], jnp.int32(0)).shape[-1]
        chunk = chunk_size(b, vocab)
    chunk = min(chunk, t)
    n = -(-t // chunk)

    def split(x: jax.Array) -> jax.Array:  # [B, T, ...] -> [n, B, chunk, ...]
        x = jnp.pad(x, ((0, 0), (0, n * chunk - t)) + ((0, 0),) * (x.ndim - 2))
        return x.reshape(b, n, chunk, *x.shape[2:]).swapaxes(0, 1)

    @jax.checkpoint  # the backward pass recomputes the chunk's logits
    def chunk_loss(h: jax.Array, target: jax.Array, weight: jax.Array, index: jax.Array):
        logits = head(h, index).astype(jnp.float32)
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, target)
        return jnp.sum(ce * weight)

    def body(total: jax.Array, xs: tuple[jax.Array, ...]) -> tuple[jax.Array, None]:
        return total + chunk_loss(*xs), None

    xs = (split(hidden), split(targets), split(weights), jnp.arange(n, dtype=jnp.int32))
    total, _ = jax.lax.scan(body, jnp.zeros((), jnp.float32), xs)
    return total, jnp.sum(weights)
