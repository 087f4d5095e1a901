"""Self-attention behind one option: ``attention_impl`` = auto | xla | cudnn | pallas.

A decoder layer calls one of two functions with its rotated queries, keys and values:

- :func:`attend` under a :class:`CausalMask` (training, evaluation, a forward pass
  without a KV cache): token-level ``valid [B, T]`` and optional ``segment_ids [B, T]``.
  Key ``j`` is visible to query ``i`` when ``j <= i``, key ``j`` is valid and, in packed
  rows, both are in the same segment. Runs fused or through XLA (the table below).
- :func:`cached_attention` under a dense boolean ``[B, T, S]`` mask (decoding with a
  KV cache): XLA, reading each layer's keys and values in the cache's heads-major
  layout, with no copy of them.

Prefix keys/values (prefix tuning, P-tuning v2) are visible to every query. Soft
prompts are ordinary tokens of the row; LLaMA-Adapter's gated prompt attention is a
separate small softmax (:func:`jpeft.models.hooks.adaption_output`) next to this one.

==========  ==============================================================================
``xla``     ``jax.nn.dot_product_attention(implementation="xla")`` under a dense mask:
            materialises ``[B, H, T, S]`` scores. The reference; CPU.
``cudnn``   cuDNN flash attention (``is_causal`` with sequence lengths; GPU, bf16/fp16).
            Each row's valid tokens are first moved to its front (a stable gather), so
            left padding and soft prompts before padding are exact too; prefixes enter
            as keys in front with as many ignored queries. No packed rows.
``pallas``  :func:`jpeft.models.flash_attention.flash_attention` (Triton on GPU, Mosaic
            on TPU, interpret mode elsewhere) with segment ids: padding, packing, GQA;
            prefixes as a second small attention merged by log-sum-exp (:func:`merge`).
``auto``    decided when lowering, per platform (``jax.lax.platform_dependent``):
            pallas on GPU and TPU, xla on CPU.
==========  ==============================================================================
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from jpeft.models.flash_attention import PAD_SEGMENT, flash_attention

IMPLEMENTATIONS = ("auto", "xla", "cudnn", "pallas")


class CausalMask(NamedTuple):
    """Causal self-attention over one call's tokens, described per token.

    Attributes:
        valid: int or bool ``[B, T]``; 0 marks padding (left, right or anywhere).
        segment_ids: optional int ``[B, T]`` of packed rows (0 = padding).
    """

    valid: jax.Array
    segment_ids: jax.Array | None = None

    def dense(self) -> jax.Array:
        """The boolean ``[B, T, T]`` mask it stands for (query, key).

        Example:
            >>> CausalMask(jnp.array([[0, 1, 1]])).dense()[0].astype(int).tolist()
            [[0, 0, 0], [0, 1, 0], [0, 1, 1]]
        """
        t = self.valid.shape[1]
        allowed = jnp.tril(jnp.ones((t, t), bool))[None] & (self.valid[:, None, :] > 0)
        if self.segment_ids is not None:
            allowed &= self.segment_ids[:, :, None] == self.segment_ids[:, None, :]
        return allowed


Mask = CausalMask | jax.Array  # a dense boolean [B, T, S] one when decoding with a cache
Prefix = tuple[jax.Array, jax.Array]


def check_implementation(name: str) -> str:
    """``name`` if it is one of :data:`IMPLEMENTATIONS`, else ValueError.

    Example:
        >>> check_implementation("pallas")
        'pallas'
    """
    if name not in IMPLEMENTATIONS:
        raise ValueError(f"attention_impl={name!r}; expected one of {list(IMPLEMENTATIONS)}")
    return name


def attend(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    mask: CausalMask,
    *,
    prefix: Prefix | None = None,
    implementation: str = "auto",
) -> jax.Array:
    """Causal scaled dot-product attention ``[B, T, H, D]`` of queries over their keys.

    Args:
        q: ``[B, T, H, D]`` rotated queries.
        k, v: ``[B, T, K, D]`` keys and values (GQA: ``H`` a multiple of ``K``).
        mask: which keys each query sees (:class:`CausalMask`).
        prefix: ``(keys, values)``, each ``[B, P, K, D]``, visible to every query.
        implementation: one of :data:`IMPLEMENTATIONS` (see the module docstring).

    Raises:
        ValueError: an unknown implementation; cudnn without a GPU, in fp32, or with
            packed rows.

    Example:
        >>> q = jnp.ones((1, 3, 2, 4)); kv = jnp.ones((1, 3, 1, 4))
        >>> attend(q, kv, kv, CausalMask(jnp.array([[0, 1, 1]])), implementation="xla").shape
        (1, 3, 2, 4)
    """
    check_implementation(implementation)
    scale = q.shape[-1] ** -0.5
    if implementation == "xla":
        return _xla(q, k, v, mask.dense(), prefix, scale)
    if implementation == "cudnn":
        _check_cudnn(q, mask)
        return compacted_attention(q, k, v, mask.valid, prefix, "cudnn")
    pallas = lambda backend, interpret: _pallas(q, k, v, mask, prefix, backend, interpret)
    triton = lambda: pallas("triton", False)
    if implementation == "pallas":
        default = lambda: pallas("triton", True)  # interpret mode
    else:
        default = lambda: _xla(q, k, v, mask.dense(), prefix, scale)
    return jax.lax.platform_dependent(
        cuda=triton, rocm=triton, tpu=lambda: pallas("mosaic", False), default=default
    )


def _xla(q, k, v, mask, prefix, scale):
    if prefix is not None:
        k = jnp.concatenate([prefix[0].astype(k.dtype), k], axis=1)
        v = jnp.concatenate([prefix[1].astype(v.dtype), v], axis=1)
        visible = jnp.ones((*mask.shape[:2], prefix[0].shape[1]), bool)
        mask = jnp.concatenate([visible, mask], axis=2)
    return jax.nn.dot_product_attention(
        q, k, v, mask=mask[:, None], scale=scale, implementation="xla"
    )


def cached_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    mask: jax.Array,
    *,
    prefix: Prefix | None = None,
) -> jax.Array:
    """Attention ``[B, T, H, D]`` of new queries over a layer of the KV cache (XLA).

    The keys and values come heads-major, as :class:`jpeft.models.cache.KVCache` stores
    them, and the queries are grouped ``[B, T, K, G, D]`` (``G = H / K``), so both dots
    (``q k^T`` and ``p v``) have the batch and key/value-head axes leading on the cache
    side: XLA's GPU compiler reads the cache as it lies instead of transposing it (into
    ``[B, K, D, S]``) every step. Scores and softmax in fp32 (as
    ``jax.nn.dot_product_attention``); masked slots get the dtype's lowest value.
    Prefix keys (prefix tuning, P-tuning v2) are a second attention merged by
    log-sum-exp (:func:`prefix_attention`, :func:`merge`), not concatenated to the
    cache, which would copy the layer's keys and values every step.

    Args:
        q: ``[B, T, H, D]`` rotated queries of the new tokens.
        k, v: ``[B, K, S, D]`` one layer of the cache (``S`` slots, ``H`` a multiple of ``K``).
        mask: boolean ``[B, T, S]``, True where a query sees a slot.
        prefix: ``(keys, values)``, each ``[B, P, K, D]``, visible to every query.

    Example:
        >>> q = jnp.ones((1, 1, 2, 4)); kv = jnp.ones((1, 1, 3, 4))
        >>> out = cached_attention(q, kv, kv, jnp.array([[[True, True, False]]]))
        >>> out.shape, out.dtype
        ((1, 1, 2, 4), dtype('float32'))
    """
    b, t, heads, d = q.shape
    kv_heads = k.shape[1]
    grouped = q.reshape(b, t, kv_heads, heads // kv_heads, d)
    if prefix is not None:
        # Else XLA merges the two dots of q (DotMerger) by concatenating the cache's
        # keys after the prefix keys: a copy of the layer's keys every step.
        grouped = jax.lax.optimization_barrier(grouped)
    scores = jnp.einsum("btkgd,bksd->bkgts", grouped, k, preferred_element_type=jnp.float32)
    scores = jnp.where(mask[:, None, None], scores * d**-0.5, jnp.finfo(jnp.float32).min)
    lse = jax.nn.logsumexp(scores, axis=-1)
    probs = jnp.exp(scores - lse[..., None]).astype(v.dtype)
    out = jnp.einsum("bkgts,bksd->btkgd", probs, v).reshape(b, t, heads, d)
    if prefix is None:
        return out.astype(q.dtype)
    lse = lse.transpose(0, 3, 1, 2).reshape(b, t, heads)
    return merge(out, lse, *prefix_attention(q, *prefix)).astype(q.dtype)


def _pallas(q, k, v, mask: CausalMask, prefix, backend: str, interpret: bool) -> jax.Array:
    segments = jnp.zeros(mask.valid.shape, jnp.int32)
    if mask.segment_ids is not None:
        segments = mask.segment_ids.astype(jnp.int32)
    segments = jnp.where(mask.valid > 0, segments, PAD_SEGMENT)
    scale = q.shape[-1] ** -0.5
    out, lse = flash_attention(q, k, v, segments, scale=scale, backend=backend, interpret=interpret)
    if prefix is None:
        return out
    return merge(out, lse, *prefix_attention(q, *prefix)).astype(q.dtype)


def prefix_attention(q: jax.Array, k: jax.Array, v: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Attention of every query over prefix keys: ``(out [B, T, H, D], lse [B, T, H])``.

    Scores are ``[B, H, T, P]`` fp32 (``P`` prefix tokens, a few dozen), not ``[T, T]``.

    Example:
        >>> out, lse = prefix_attention(jnp.ones((1, 3, 2, 4)), jnp.ones((1, 5, 1, 4)),
        ...                             jnp.ones((1, 5, 1, 4)))
        >>> out.shape, round(float(lse[0, 0, 0]), 4)
        ((1, 3, 2, 4), 3.6094)
    """
    b, t, heads, d = q.shape
    kv_heads = k.shape[2]
    grouped = q.reshape(b, t, kv_heads, heads // kv_heads, d)
    scores = jnp.einsum(
        "btkgd,bpkd->btkgp", grouped, k.astype(q.dtype), preferred_element_type=jnp.float32
    )
    scores = scores * d**-0.5
    lse = jax.nn.logsumexp(scores, axis=-1)
    probs = jnp.exp(scores - lse[..., None]).astype(q.dtype)
    out = jnp.einsum("btkgp,bpkd->btkgd", probs, v.astype(q.dtype))
    return out.reshape(b, t, heads, d), lse.reshape(b, t, heads)


def merge(out_a: jax.Array, lse_a: jax.Array, out_b: jax.Array, lse_b: jax.Array) -> jax.Array:
    """Attention over the union of two disjoint key sets from each part's output and LSE.

    ``out = (e^lse_a out_a + e^lse_b out_b) / (e^lse_a + e^lse_b)``, in fp32
    (FlashAttention's rescaling, Dao et al. 2022, section 3.1). Outputs ``[B, T, H, D]``,
    LSEs ``[B, T, H]``.

    Example:
        >>> merge(jnp.ones((1, 1, 1, 2)), jnp.zeros((1, 1, 1)),
        ...       jnp.zeros((1, 1, 1, 2)), jnp.zeros((1, 1, 1))).tolist()
        [[[[0.5, 0.5]]]]
    """
    top = jnp.maximum(lse_a, lse_b)
    w_a, w_b = jnp.exp(lse_a - top)[..., None], jnp.exp(lse_b - top)[..., None]
    total = w_a * out_a.astype(jnp.float32) + w_b * out_b.astype(jnp.float32)
    return total / (w_a + w_b)


def _check_cudnn(q: jax.Array, mask: CausalMask) -> None:
    if jax.default_backend() != "gpu":
        raise ValueError(
            f"attention_impl='cudnn' needs a GPU; this process runs on {jax.default_backend()}"
        )
    if q.dtype not in (jnp.bfloat16, jnp.float16):
        raise ValueError(f"attention_impl='cudnn' needs bfloat16 or float16 compute, not {q.dtype}")
    if mask.segment_ids is not None:
        raise ValueError("attention_impl='cudnn' cannot mask packed rows (segment_ids); use pallas")


def compacted_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    valid: jax.Array,
    prefix: Prefix | None,
    implementation: str,
) -> jax.Array:
    """Causal attention through ``jax.nn.dot_product_attention`` with sequence lengths.

    Each row's valid tokens are gathered to its front (in order), so the row is
    right-padded and ``query_seq_lengths``/``key_value_seq_lengths`` mask exactly the
    :class:`CausalMask` of ``valid``; the output is gathered back. ``P`` prefix keys go in
    front with ``P`` zero queries whose outputs are dropped: top-left causal masking
    then shows every prefix key to every real query. ``implementation="cudnn"`` is the
    fused GPU path; ``"xla"`` computes the same thing anywhere (used by its tests).

    Example:
        >>> q = jnp.ones((1, 3, 2, 4)); kv = jnp.ones((1, 3, 1, 4))
        >>> compacted_attention(q, kv, kv, jnp.array([[0, 1, 1]]), None, "xla").shape
        (1, 3, 2, 4)
    """
    b, _, heads, d = q.shape
    order = jnp.argsort(valid <= 0, axis=1, stable=True)  # valid tokens first, in order
    lengths = jnp.sum(valid > 0, axis=1).astype(jnp.int32)
    gather = lambda x: jnp.take_along_axis(x, order[:, :, None, None], axis=1)
    q, k, v = gather(q), gather(k), gather(v)
    n_prefix = 0
    if prefix is not None:
        n_prefix = prefix[0].shape[1]
        q = jnp.concatenate([jnp.zeros((b, n_prefix, heads, d), q.dtype), q], axis=1)
        k = jnp.concatenate([prefix[0].astype(k.dtype), k], axis=1)
        v = jnp.concatenate([prefix[1].astype(v.dtype), v], axis=1)
        lengths = lengths + n_prefix
    out = jax.nn.dot_product_attention(
        q,
        k,
        v,
        scale=d**-0.5,
        is_causal=True,
        query_seq_lengths=lengths,
        key_value_seq_lengths=lengths,
        implementation=implementation,
    )[:, n_prefix:]
    inverse = jnp.argsort(order, axis=1)
    return jnp.take_along_axis(out, inverse[:, :, None, None], axis=1)
