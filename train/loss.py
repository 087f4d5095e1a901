"""Next-token cross-entropy, from logits or chunk by chunk from the final hidden states.

:func:`chunked_token_loss` never holds the fp32 ``[B, T, vocab]`` logits (7 GB of
temporaries at Llama-3's vocab of 128,256 for 4 x 2048 tokens): a ``lax.scan`` over
sequence chunks computes each chunk's logits and cross-entropy and, when differentiated,
its gradients right away, so no chunk's logits outlive it and none is recomputed. Loss
and gradients equal :func:`token_loss` on the full logits.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

# Bytes of fp32 logits per chunk when the chunk size is left to :func:`chunk_size`.
CHUNK_BYTES = 256 * 2**20

Head = Callable[[Any, jax.Array, jax.Array], jax.Array]


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
    params: Any,
    input_ids: jax.Array,
    loss_mask: jax.Array,
    attention_mask: jax.Array | None = None,
    segment_ids: jax.Array | None = None,
    *,
    chunk: int | None = None,
) -> tuple[jax.Array, jax.Array]:
    """:func:`token_loss` of ``head(params, hidden)`` without materialising all the logits.

    Differentiable in ``hidden`` and ``params``. Each chunk's logits are computed once:
    under differentiation the forward scan also takes the chunk's gradients (as
    Liger-Kernel's fused linear cross-entropy does), so the backward pass only scales
    them; the gradient of ``params`` is accumulated in their dtype.

    Args:
        hidden: ``[B, T, hidden]`` final normed hidden states
            (``Llama(...).apply(..., return_hidden=True)``).
        head: ``head(params, h [B, C, hidden], index) -> logits [B, C, vocab]`` for chunk
            number ``index`` (an int32 scalar, e.g. to fold into a dropout key).
        params: a pytree of float arrays ``head`` differentiates (e.g. the trainable
            partition; close over frozen values instead of passing them).
        input_ids, loss_mask, attention_mask, segment_ids: ``[B, T]``, as in
            :func:`token_loss`.
        chunk: sequence positions per chunk (default :func:`chunk_size`); ``T`` is
            padded up to a multiple of it with weightless positions.

    Returns:
        ``(sum of fp32 cross-entropy over targets, number of targets)``.

    Example:
        >>> w = jnp.arange(12.0).reshape(3, 4) / 10
        >>> hidden = jnp.ones((2, 5, 3)); ids = jnp.ones((2, 5), jnp.int32)
        >>> head = lambda w, h, index: h @ w
        >>> chunked = chunked_token_loss(hidden, head, w, ids, ids, chunk=2)
        >>> full = token_loss(hidden @ w, ids, ids)
        >>> bool(jnp.allclose(chunked[0], full[0])), int(chunked[1])
        (True, 8)
    """
    b, t, _ = hidden.shape
    weights = jnp.pad(target_weights(loss_mask, attention_mask, segment_ids), ((0, 0), (0, 1)))
    targets = jnp.pad(input_ids[:, 1:], ((0, 0), (0, 1)))
    if chunk is None:
        vocab = jax.eval_shape(head, params, hidden[:, :1], jnp.int32(0)).shape[-1]
        chunk = chunk_size(b, vocab)
    chunk = min(chunk, t)
    n = -(-t // chunk)

    def split(x: jax.Array) -> jax.Array:  # [B, T, ...] -> [n, B, chunk, ...]
        x = jnp.pad(x, ((0, 0), (0, n * chunk - t)) + ((0, 0),) * (x.ndim - 2))
        return x.reshape(b, n, chunk, *x.shape[2:]).swapaxes(0, 1)

    labels = (split(targets), split(weights), jnp.arange(n, dtype=jnp.int32))
    head, params = _only_read(head, params, hidden[:, :chunk])
    return _loss_sum(head, params, split(hidden), labels), jnp.sum(weights)


def _only_read(head: Head, params: Any, h: jax.Array) -> tuple[Head, list[jax.Array]]:
    """``head`` as a function of the leaves of ``params`` it reads, and those leaves.

    The others (e.g. every LoRA factor but lm_head's) then get no gradient accumulator.
    """
    leaves, tree = jax.tree.flatten(params)
    shapes = [jax.ShapeDtypeStruct(x.shape, x.dtype) for x in leaves]
    jaxpr = jax.make_jaxpr(lambda xs: head(tree.unflatten(xs), h, jnp.int32(0)))(shapes).jaxpr
    read = {id(v) for eqn in jaxpr.eqns for v in eqn.invars} | {id(v) for v in jaxpr.outvars}
    used = [id(v) in read for v in jaxpr.invars]

    def read_head(read_leaves: list[jax.Array], h: jax.Array, index: jax.Array) -> jax.Array:
        given = iter(read_leaves)
        full = [
            next(given) if u else jnp.zeros(s.shape, s.dtype)
            for u, s in zip(used, shapes, strict=True)
        ]
        return head(tree.unflatten(full), h, index)

    return read_head, [x for x, u in zip(leaves, used, strict=True) if u]


def _chunk_loss(head: Head, params: Any, h: jax.Array, labels: tuple[jax.Array, ...]):
    target, weight, index = labels
    logits = head(params, h, index).astype(jnp.float32)
    return jnp.sum(optax.softmax_cross_entropy_with_integer_labels(logits, target) * weight)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _loss_sum(head: Head, params: Any, hidden: jax.Array, labels: tuple[jax.Array, ...]):
    """Loss sum over chunks: ``hidden [n, B, chunk, H]``, labels ``[n, B, chunk]`` each."""

    def body(total: jax.Array, xs: tuple[jax.Array, ...]) -> tuple[jax.Array, None]:
        h, *chunk_labels = xs
        return total + _chunk_loss(head, params, h, tuple(chunk_labels)), None

    total, _ = jax.lax.scan(body, jnp.zeros((), jnp.float32), (hidden, *labels))
    return total


def _loss_sum_fwd(head: Head, params: Any, hidden: jax.Array, labels: tuple[jax.Array, ...]):
    grad = jax.value_and_grad(_chunk_loss, argnums=(1, 2))

    def body(carry, xs):
        total, d_params = carry
        h, *chunk_labels = xs
        loss, (dp, dh) = grad(head, params, h, tuple(chunk_labels))
        d_params = jax.tree.map(lambda a, b: a + b.astype(a.dtype), d_params, dp)
        return (total + loss, d_params), dh

    init = (jnp.zeros((), jnp.float32), jax.tree.map(jnp.zeros_like, params))
    (total, d_params), d_hidden = jax.lax.scan(body, init, (hidden, *labels))
    return total, (d_params, d_hidden)


def _loss_sum_bwd(head: Head, residuals: tuple[Any, jax.Array], g: jax.Array):
    d_params, d_hidden = residuals
    scale = lambda d: (g * d).astype(d.dtype)
    return jax.tree.map(scale, d_params), scale(d_hidden), None


_loss_sum.defvjp(_loss_sum_fwd, _loss_sum_bwd)
