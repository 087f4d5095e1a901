"""Pallas flash attention: causal, segment ids, GQA, and a differentiable log-sum-exp.

:func:`flash_attention` computes causal self-attention without a ``[T, T]`` score
matrix in memory: key ``j`` is visible to query ``i`` when ``j <= i`` and both tokens
have the same segment id. It also returns each query's log-sum-exp of scores, and both
outputs are differentiable; the LSE cotangent ``g`` enters the backward pass as
``dS = P * (dP - (rowsum(dO * O) - g))``, so attentions over disjoint key sets can be
merged exactly (:func:`jpeft.models.attention.merge`).

Two backends (own code because the stock ops have no LSE gradient, and the GPU op no GQA):

- ``"triton"`` (GPU): FlashAttention-2 (Dao 2023, Alg. 1 forward; the backward split
  into a dK/dV kernel over key blocks and a dQ kernel over query blocks, as in
  ``jax.experimental.pallas.ops.gpu.attention``). Causal block skipping. GQA without
  repeated keys: query head ``h`` reads key head ``h // G`` through the ``BlockSpec``
  index map, and each dK/dV program loops over the ``G`` query heads of its key head
  (a group size that is not a power of two falls back to repeated keys).
- ``"mosaic"`` (TPU): JAX's own TPU kernels (``jax.experimental.pallas.ops.tpu
  .flash_attention``), called through their forward with residuals and their dK/dV and
  dQ kernels, which take the row term ``di`` that the LSE cotangent changes. Keys are
  repeated over each group (those kernels need equal head counts).

Sequences are padded to a multiple of the block size with an unmatched segment id.
The forward's residuals carry the names in :data:`RESIDUALS` (``jax.ad_checkpoint
.checkpoint_name``), so a remat policy can keep them and skip recomputing the forward.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.ad_checkpoint import checkpoint_name
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu
from jax.experimental.pallas.ops.tpu import flash_attention as tpu_flash

BACKENDS = ("triton", "mosaic")
# Segment id of the padding this module adds (and of the padding callers mark).
PAD_SEGMENT = int(jnp.iinfo(jnp.int32).min)
# Names of the forward's output and row statistics (what the backward needs beyond q, k, v).
RESIDUALS = ("attention_out", "attention_stats")
_MASKED = -1e30  # score of an invisible key (finite: a block may be fully masked)
_BLOCK_FWD = (128, 64)  # (queries, keys) per forward program
_BLOCK_BWD = 64  # queries and keys per backward program
_TPU_BLOCK = 128  # the TPU kernels' block along queries and keys


@functools.partial(jax.jit, static_argnames=("scale", "backend", "interpret"))
def flash_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    segment_ids: jax.Array,
    *,
    scale: float,
    backend: str = "triton",
    interpret: bool = False,
) -> tuple[jax.Array, jax.Array]:
    """Causal attention within segments: ``(out [B, T, H, D], lse [B, T, H] fp32)``.

    Args:
        q: ``[B, T, H, D]`` queries (rotated).
        k, v: ``[B, T, K, D]`` keys and values; ``H`` must be a multiple of ``K`` (GQA).
        segment_ids: int32 ``[B, T]``; tokens see earlier tokens of their own segment.
            Every query sees at least itself, so no row is empty.
        scale: multiplies the scores (``head_dim ** -0.5``).
        backend: ``"triton"`` (GPU) or ``"mosaic"`` (TPU).
        interpret: run the Triton kernels in Pallas interpret mode (CPU tests; the TPU
            kernels interpret under ``jax.experimental.pallas.tpu.force_tpu_interpret_mode``).

    Raises:
        ValueError: unknown backend, or head counts that do not group.

    Example:
        >>> q = jnp.ones((1, 4, 2, 8)); kv = jnp.ones((1, 4, 1, 8))
        >>> out, lse = flash_attention(q, kv, kv, jnp.zeros((1, 4), jnp.int32),
        ...                            scale=8**-0.5, interpret=True)
        >>> out.shape, lse.shape, round(float(lse[0, 3, 0]), 4)
        ((1, 4, 2, 8), (1, 4, 2), 4.2147)
    """
    if backend not in BACKENDS:
        raise ValueError(f"flash_attention: backend={backend!r}; expected one of {BACKENDS}")
    b, t, heads, d = q.shape
    if k.shape[2] == 0 or heads % k.shape[2] or k.shape != v.shape or k.shape[:2] != (b, t):
        raise ValueError(
            f"flash_attention: q {q.shape} needs k and v [B, T, K, D] with H a multiple of K;"
            f" got k {k.shape}, v {v.shape}"
        )
    if backend == "triton" and t <= _TPU_BLOCK:  # one block (Triton: a power of two)
        padded = max(16, 1 << (t - 1).bit_length())
    else:  # whole 128-row blocks, a multiple of every block size here
        padded = -(-t // _TPU_BLOCK) * _TPU_BLOCK
    width = max(16, 1 << (d - 1).bit_length()) if backend == "triton" else d
    pad = lambda x: jnp.pad(x, ((0, 0), (0, padded - t), (0, 0), (0, width - d)))
    seg = jnp.pad(
        segment_ids.astype(jnp.int32), ((0, 0), (0, padded - t)), constant_values=PAD_SEGMENT
    )
    if backend == "triton":
        group = heads // k.shape[2]
        if group & (group - 1):  # Triton blocks are powers of two: one key head per query head
            k, v = jnp.repeat(k, group, axis=2), jnp.repeat(v, group, axis=2)
        out, lse = _triton(pad(q), pad(k), pad(v), seg, scale, interpret)
    else:
        out, lse = _mosaic(pad(q), pad(k), pad(v), seg, scale, k.shape[2])
    return out[:, :t, :, :d], lse[:, :t]


def _named(out: jax.Array, *stats: jax.Array) -> tuple[jax.Array, ...]:
    out_name, stats_name = RESIDUALS
    return checkpoint_name(out, out_name), *(checkpoint_name(x, stats_name) for x in stats)


# ---------------------------------------------------------------- triton (GPU) kernels


def _visible(q_seg, k_seg, q_start, k_start):
    q_pos = q_start + jnp.arange(q_seg.shape[0])
    k_pos = k_start + jnp.arange(k_seg.shape[0])
    return (q_seg[:, None] == k_seg[None, :]) & (q_pos[:, None] >= k_pos[None, :])


def _forward_kernel(q_ref, k_ref, v_ref, q_seg_ref, k_seg_ref, o_ref, lse_ref, *, scale, block_k):
    block_q, width = q_ref.shape
    start = pl.program_id(0) * block_q
    q, q_seg = q_ref[...], q_seg_ref[...]

    def body(j, carry):
        acc, m, row_sum = carry
        keys = pl.ds(j * block_k, block_k)
        s = plgpu.dot(q, k_ref[keys, :], trans_b=True) * scale
        mask = _visible(q_seg, k_seg_ref[keys], start, j * block_k)
        m_new = jnp.maximum(m, jnp.max(jnp.where(mask, s, _MASKED), axis=1))
        p = jnp.where(mask, jnp.exp(s - m_new[:, None]), 0.0)
        correction = jnp.exp(m - m_new)
        v = v_ref[keys, :]
        acc = correction[:, None] * acc + plgpu.dot(p.astype(v.dtype), v)
        return acc, m_new, correction * row_sum + jnp.sum(p, axis=1)

    init = (
        jnp.zeros((block_q, width), jnp.float32),
        jnp.full((block_q,), -jnp.inf, jnp.float32),
        jnp.zeros((block_q,), jnp.float32),
    )
    n_blocks = lax.div(start + block_q + block_k - 1, block_k)  # up to the diagonal
    acc, m, row_sum = lax.fori_loop(0, n_blocks, body, init)
    o_ref[...] = (acc / row_sum[:, None]).astype(o_ref.dtype)
    lse_ref[...] = m + jnp.log(row_sum)


def _probs(q, k, q_seg, k_seg, q_start, k_start, lse, scale):
    s = plgpu.dot(q, k, trans_b=True) * scale
    mask = _visible(q_seg, k_seg, q_start, k_start)
    return jnp.where(mask, jnp.exp(s - lse[:, None]), 0.0)


def _dkv_kernel(
    q_ref, k_ref, v_ref, q_seg_ref, k_seg_ref, do_ref, lse_ref, delta_ref, dk_ref, dv_ref,
    *, scale, block_q,
):  # fmt: skip
    """dK, dV of one key block of one key head, from all ``G`` query heads of its group.

    ``q_ref``/``do_ref`` hold ``[T, G, D]``, ``lse_ref``/``delta_ref`` ``[G, T]``.
    """
    block_k, width = k_ref.shape
    group = q_ref.shape[1]
    k_start = pl.program_id(2) * block_k
    k, v, k_seg = k_ref[...], v_ref[...], k_seg_ref[...]

    def body(step, carry):  # one (query block, query head) pair per step
        dk, dv = carry
        i, head = lax.div(step, group), lax.rem(step, group)
        rows = pl.ds(i * block_q, block_q)
        q, do = q_ref[rows, head, :], do_ref[rows, head, :]
        lse, delta = lse_ref[head, rows], delta_ref[head, rows]
        p = _probs(q, k, q_seg_ref[rows], k_seg, i * block_q, k_start, lse, scale)
        dv = dv + plgpu.dot(p.astype(do.dtype), do, trans_a=True)
        ds = p * (plgpu.dot(do, v, trans_b=True) - delta[:, None]) * scale
        return dk + plgpu.dot(ds.astype(q.dtype), q, trans_a=True), dv

    zeros = jnp.zeros((block_k, width), jnp.float32)
    first = lax.div(k_start, block_q)  # earlier query blocks see none of these keys
    steps = (first * group, q_ref.shape[0] // block_q * group)
    dk, dv = lax.fori_loop(*steps, body, (zeros, zeros))
    dk_ref[...], dv_ref[...] = dk.astype(dk_ref.dtype), dv.astype(dv_ref.dtype)


def _dq_kernel(
    q_ref, k_ref, v_ref, q_seg_ref, k_seg_ref, do_ref, lse_ref, delta_ref, dq_ref,
    *, scale, block_k,
):  # fmt: skip
    block_q, width = q_ref.shape
    q_start = pl.program_id(2) * block_q
    q, do, q_seg, lse, delta = q_ref[...], do_ref[...], q_seg_ref[...], lse_ref[...], delta_ref[...]

    def body(j, dq):
        keys = pl.ds(j * block_k, block_k)
        k = k_ref[keys, :]
        p = _probs(q, k, q_seg, k_seg_ref[keys], q_start, j * block_k, lse, scale)
        ds = p * (plgpu.dot(do, v_ref[keys, :], trans_b=True) - delta[:, None]) * scale
        return dq + plgpu.dot(ds.astype(k.dtype), k)

    n_blocks = lax.div(q_start + block_q + block_k - 1, block_k)
    dq = lax.fori_loop(0, n_blocks, body, jnp.zeros((block_q, width), jnp.float32))
    dq_ref[...] = dq.astype(dq_ref.dtype)


def _params(width: int) -> plgpu.CompilerParams:
    return plgpu.CompilerParams(num_warps=4 if width <= 64 else 8, num_stages=2)


def _causal_pairs(t: int, block_q: int, block_k: int) -> int:
    """(query block, key block) pairs the causal kernels visit."""
    return sum(-(-((i + 1) * block_q) // block_k) for i in range(t // block_q))


def _triton_forward(q, k, v, seg, scale, interpret):
    b, t, heads, width = q.shape
    group = heads // k.shape[2]
    block_q, block_k = (min(n, t) for n in _BLOCK_FWD)
    grid = (t // block_q, b, heads)
    rows = lambda i, j, h: (j, i, h, 0)
    whole = pl.BlockSpec((None, t, None, width), lambda i, j, h: (j, 0, h // group, 0))
    cost = pl.CostEstimate(
        flops=4 * b * heads * width * block_q * block_k * _causal_pairs(t, block_q, block_k),
        transcendentals=b * heads * block_q * block_k * _causal_pairs(t, block_q, block_k),
        bytes_accessed=2 * q.nbytes + k.nbytes + v.nbytes,
    )
    return pl.pallas_call(
        functools.partial(_forward_kernel, scale=scale, block_k=block_k),
        grid=grid,
        in_specs=[
            pl.BlockSpec((None, block_q, None, width), rows),
            whole,
            whole,
            pl.BlockSpec((None, block_q), lambda i, j, h: (j, i)),
            pl.BlockSpec((None, t), lambda i, j, h: (j, 0)),
        ],
        out_specs=[
            pl.BlockSpec((None, block_q, None, width), rows),
            pl.BlockSpec((None, None, block_q), lambda i, j, h: (j, h, i)),
        ],
        out_shape=[
            jax.ShapeDtypeStruct(q.shape, q.dtype),
            jax.ShapeDtypeStruct((b, heads, t), jnp.float32),
        ],
        compiler_params=_params(width),
        cost_estimate=cost,
        interpret=interpret,
        name="flash_attention_forward",
    )(q, k, v, seg, seg)


def _triton_backward(q, k, v, seg, do, lse, delta, scale, interpret):
    b, t, heads, width = q.shape
    kv_heads = k.shape[2]
    group = heads // kv_heads
    block = min(_BLOCK_BWD, t)
    scores = _causal_pairs(t, block, block) * b * heads * block * block  # computed scores

    def call(kernel, grid, q_spec, kv_spec, q_seg, kv_seg, stats, out_specs, out_shape, dots):
        return pl.pallas_call(
            kernel,
            grid=grid,
            in_specs=[q_spec, kv_spec, kv_spec, q_seg, kv_seg, q_spec, stats, stats],
            out_specs=out_specs,
            out_shape=out_shape,
            compiler_params=_params(width),
            cost_estimate=pl.CostEstimate(
                flops=2 * dots * width * scores, transcendentals=scores, bytes_accessed=0
            ),
            interpret=interpret,
            name="flash_attention" + kernel.func.__name__.removesuffix("_kernel"),
        )(q, k, v, seg, seg, do, lse, delta)

    whole_seg = pl.BlockSpec((None, t), lambda i, h, j: (i, 0))
    block_seg = pl.BlockSpec((None, block), lambda i, h, j: (i, j))
    # dK/dV (4 dots per block pair): one program per key block of a key head, looping
    # over the query heads of its group.
    block_kv = pl.BlockSpec((None, block, None, width), lambda i, g, j: (i, j, g, 0))
    dk, dv = call(
        functools.partial(_dkv_kernel, scale=scale, block_q=block),
        (b, kv_heads, t // block),
        pl.BlockSpec((None, t, group, width), lambda i, g, j: (i, 0, g, 0)),
        block_kv,
        whole_seg,
        block_seg,
        pl.BlockSpec((None, group, t), lambda i, g, j: (i, g, 0)),
        [block_kv, block_kv],
        [jax.ShapeDtypeStruct(k.shape, k.dtype)] * 2,
        dots=4,
    )
    # dQ (3 dots per block pair): one program per query block of a query head.
    block_q = pl.BlockSpec((None, block, None, width), lambda i, h, j: (i, j, h, 0))
    dq = call(
        functools.partial(_dq_kernel, scale=scale, block_k=block),
        (b, heads, t // block),
        block_q,
        pl.BlockSpec((None, t, None, width), lambda i, h, j: (i, 0, h // group, 0)),
        block_seg,
        whole_seg,
        pl.BlockSpec((None, None, block), lambda i, h, j: (i, h, j)),
        block_q,
        jax.ShapeDtypeStruct(q.shape, q.dtype),
        dots=3,
    )
    return dq, dk, dv


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _triton(q, k, v, seg, scale, interpret):
    return _triton_fwd(q, k, v, seg, scale, interpret)[0]


def _triton_fwd(q, k, v, seg, scale, interpret):
    out, lse = _named(*_triton_forward(q, k, v, seg, scale, interpret))
    return (out, lse.transpose(0, 2, 1)), (q, k, v, seg, out, lse)


def _triton_bwd(scale, interpret, residuals, cotangents):
    q, k, v, seg, out, lse = residuals
    do, dlse = cotangents
    delta = jnp.sum(out.astype(jnp.float32) * do.astype(jnp.float32), axis=-1) - dlse
    dq, dk, dv = _triton_backward(
        q, k, v, seg, do.astype(q.dtype), lse, delta.transpose(0, 2, 1), scale, interpret
    )
    return dq, dk, dv, None


_triton.defvjp(_triton_fwd, _triton_bwd)


# ---------------------------------------------------------------- mosaic (TPU) kernels


def _heads_first(x: jax.Array) -> jax.Array:
    return x.transpose(0, 2, 1, 3)


def _tpu_forward(q, k, v, seg, scale):
    """JAX's TPU forward of ``[B, T, *, D]`` inputs: ``(q, k, v, out, row_sum, row_max)``,
    heads first, keys and values repeated over each group."""
    group = q.shape[2] // k.shape[2]
    q, k, v = _heads_first(q), *(_heads_first(jnp.repeat(x, group, axis=2)) for x in (k, v))
    segments = tpu_flash.SegmentIds(seg, seg)
    block = _TPU_BLOCK
    out, row_sum, row_max = tpu_flash._flash_attention_impl(
        q, k, v, None, segments, True, True, scale, 1, block, block, block, False
    )
    return q, k, v, out, row_sum, row_max


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _mosaic(q, k, v, seg, scale, kv_heads):
    return _mosaic_fwd(q, k, v, seg, scale, kv_heads)[0]


def _mosaic_fwd(q, k, v, seg, scale, kv_heads):
    qh, kh, vh, *stats = _tpu_forward(q, k, v, seg, scale)
    out, row_sum, row_max = _named(*stats)
    lse = (row_max + jnp.log(row_sum)).transpose(0, 2, 1)
    return (_heads_first(out), lse), (qh, kh, vh, seg, out, row_sum, row_max)


def _mosaic_bwd(scale, kv_heads, residuals, cotangents):
    qh, kh, vh, seg, out, row_sum, row_max = residuals
    do, dlse = cotangents
    do = _heads_first(do)
    di = jnp.sum(out.astype(jnp.float32) * do.astype(jnp.float32), axis=-1)
    di = di - dlse.transpose(0, 2, 1)
    common = dict(sm_scale=scale, causal=True, mask_value=tpu_flash.DEFAULT_MASK_VALUE, debug=False)
    segments = tpu_flash.SegmentIds(seg, seg)
    blocks = dict(block_q_major=_TPU_BLOCK, block_k_major=_TPU_BLOCK, block_k=_TPU_BLOCK)
    dk, dv = tpu_flash._flash_attention_bwd_dkv(
        qh, kh, vh, None, segments, row_sum, row_max, do, di,
        block_q=_TPU_BLOCK, **blocks, **common,
    )  # fmt: skip
    dq, _ = tpu_flash._flash_attention_bwd_dq(
        qh, kh, vh, None, segments, row_sum, row_max, do, di, **blocks, **common
    )
    b, heads, t, d = qh.shape
    sum_group = lambda x: x.reshape(b, kv_heads, heads // kv_heads, t, d).sum(axis=2)
    return _heads_first(dq), _heads_first(sum_group(dk)), _heads_first(sum_group(dv)), None


_mosaic.defvjp(_mosaic_fwd, _mosaic_bwd)
