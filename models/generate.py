"""Text generation with a KV cache: one prefill call, then incremental decode under ``jit``.

The prompt batch may be left- or right-padded. Real tokens get RoPE positions
from the count of valid tokens before them, and padded cache slots are masked
out of attention, so a right-padded row simply continues after its last real
token (its pad slots stay between the prompt and the new tokens, never
attended). Soft prompts (``params["prompt"]``) are prepended by the prefill call
and take cache slots; prefixes (``params["prefix"]``) take none.

The whole loop is one compiled program per (batch bucket, prompt-length bucket,
``max_new_tokens``) shape and sampling mode (greedy, or sampling with a given
``top_k`` and with/without top-p); temperature, top-p, stop and pad ids and the
key are runtime values. Prompts are left-padded (masked) to the next bucket
(:func:`bucket`: 16, 24, 32, 48, 64, ... tokens) and the batch to the next of
1, 2, 3, 4, 6, 8, 12, ... rows, so prompts of many lengths share a few programs;
padding never changes a row's tokens. It stops as soon as every row has produced a
stop token. The KV cache is the decode loop's carry and each layer updates it in
place (:func:`decode_step`), so a token costs reading the weights and the cache once.

Decoding reads every weight once per token, so with one active adapter (no
``adapter_ids``) each weight node that folds into a plain weight no larger than
itself (LoRA and DoRA over a 16/32-bit base, fully trained tensors) is merged once
at the start of the call (:func:`merge_for_decoding`); the params passed in stay
unmerged. Mixed-adapter batches and 4-bit bases (whose merge would be a dense,
larger weight) keep the unmerged matmul.
"""

from __future__ import annotations

import dataclasses
import functools
import warnings
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jpeft.models import hooks, llama, sampling
from jpeft.models.cache import KVCache
from jpeft.models.config import LlamaConfig
from jpeft.models.context import Context, compute_dtype
from jpeft.models.pytree import Params
from jpeft.models.selection import check_adapter_ids
from jpeft.nodes import is_node
from jpeft.partition import nbytes

PROMPT_BUCKET = 16
"""The shortest prompt length :func:`generate` compiles for (shorter prompts are padded)."""


@functools.partial(
    jax.tree_util.register_dataclass, data_fields=["tokens", "lengths"], meta_fields=[]
)
@dataclasses.dataclass(frozen=True)
class GenerationResult:
    """New tokens of each row.

    Attributes:
        tokens: int32 ``[B, max_new_tokens]``; after a row's stop token, pad ids.
        lengths: int32 ``[B]``, tokens generated per row, counting the stop token.
    """

    tokens: jax.Array
    lengths: jax.Array


def virtual_tokens(params: Params, batch_size: int, ctx: Context | None = None) -> int:
    """Cache slots the soft prompts of ``params`` occupy; 0 without one.

    Example:
        >>> virtual_tokens({"embed_tokens": {}}, batch_size=2)
        0
    """
    return hooks.prompt_length(params, batch_size, ctx or Context())


def left_pad(
    prompts: Sequence[Sequence[int]],
    pad_id: int,
    rows: int | None = None,
    width: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Token-id prompts right-aligned in int32 ``ids [rows, width]`` and their ``mask``.

    ``rows`` (default: one per prompt) may exceed the prompts, to keep one batch
    shape: the extra rows hold a single valid pad token, so :func:`generate` accepts
    them (ignore their output). ``width`` defaults to the longest prompt.

    Example:
        >>> ids, mask = left_pad([[5, 6], [7]], pad_id=0, rows=3)
        >>> ids.tolist(), mask.tolist()
        ([[5, 6], [0, 7], [0, 0]], [[1, 1], [0, 1], [0, 1]])
    """
    rows = len(prompts) if rows is None else rows
    width = max(len(p) for p in prompts) if width is None else width
    ids = np.full((rows, width), pad_id, np.int32)
    mask = np.zeros((rows, width), np.int32)
    for i in range(rows):
        prompt = list(prompts[i]) if i < len(prompts) else [pad_id]
        ids[i, width - len(prompt) :] = prompt
        mask[i, width - len(prompt) :] = 1
    return ids, mask


def bucket(n: int, minimum: int = 1) -> int:
    """The smallest size ``>= max(n, minimum)`` of the form ``2**k`` or ``3 * 2**k``.

    Consecutive sizes grow by 4/3 or 3/2, so padding to a bucket costs at most 50%
    (for ``n`` above ``minimum``) and ``n`` up to 4096 falls in 24 buckets.

    Example:
        >>> [bucket(n) for n in (1, 3, 5, 7, 9, 13, 17)], bucket(5, minimum=16)
        ([1, 3, 6, 8, 12, 16, 24], 16)
    """
    size = max(int(n), int(minimum), 1)
    power = 1 << (size - 1).bit_length()
    return 3 * power // 4 if 3 * power // 4 >= size else power


def merge_for_decoding(params: Params) -> Params:
    """``params`` with each node that merges into a plain weight no larger than itself merged.

    Decoding is bound by reading the weights, so a node is replaced by its
    ``merged()`` form when that form is a plain array of at most the node's bytes:
    LoRA/DoRA over a 16/32-bit base (the adapters fold into the base; inactive
    adapters, used only through ``adapter_ids``, are dropped) and fully trained
    tensors. Nodes that do not merge (soft prompts, prefixes, bottleneck adapters)
    or whose merge would be larger (LoRA over an NF4 base: a dense weight instead of
    4-bit codes) stay as they are. Pure; use it for single-adapter inference only.

    Example:
        >>> from jpeft.nodes import Trained
        >>> merged = merge_for_decoding({"norm": Trained(jnp.ones(3))})
        >>> type(merged["norm"]).__name__
        'ArrayImpl'
    """

    def fold(x: Any) -> Any:
        if not is_node(x):
            return x
        with warnings.catch_warnings():  # merging over a 4-bit base warns; it is not taken
            warnings.simplefilter("ignore")
            shape = jax.eval_shape(lambda n: n.merged(), x)
        if isinstance(shape, jax.ShapeDtypeStruct) and nbytes(shape) <= nbytes(x):
            return x.merged()
        return x

    return jax.tree.map(fold, params, is_leaf=is_node)


def prefill(
    params: Params,
    cfg: LlamaConfig,
    input_ids: jax.Array,
    attention_mask: jax.Array,
    cache: KVCache,
    ctx: Context | None = None,
) -> tuple[jax.Array, KVCache]:
    """Run the prompt through the model; logits ``[B, vocab]`` at each row's last real token.

    Example:
        >>> cfg = LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32,
        ...                   num_hidden_layers=2, num_attention_heads=2)
        >>> params = llama.init_params(jax.random.key(0), cfg)
        >>> ids, mask = jnp.ones((2, 4), jnp.int32), jnp.array([[1, 1, 1, 0], [0, 1, 1, 1]])
        >>> logits, cache = prefill(params, cfg, ids, mask, KVCache.create(cfg, 2, 8))
        >>> logits.shape, int(cache.length)
        ((2, 32), 4)
    """
    logits, cache = llama.forward(
        params, cfg, input_ids, attention_mask=attention_mask, cache=cache, ctx=ctx
    )
    t = input_ids.shape[1]
    last = t - 1 - jnp.argmax(attention_mask[:, ::-1] > 0, axis=1)
    return jnp.take_along_axis(logits, last[:, None, None], axis=1)[:, 0], cache


def decode_step(
    params: Params,
    cfg: LlamaConfig,
    tokens: jax.Array,
    cache: KVCache,
    ctx: Context | None = None,
) -> tuple[jax.Array, KVCache]:
    """Feed one token per row (``[B]``); logits ``[B, vocab]`` for the token after it.

    Each layer writes its new key and value into the stacked cache with one dynamic
    update (:func:`jpeft.models.cache.write_layer`), so jitted with the cache donated
    (``jax.jit(decode_step, static_argnums=1, donate_argnums=3)``), or as the loop
    carry of :func:`generate`, the step updates the cache buffer in place: it reads
    the weights and the cache once and writes only the new slots
    (``bench/decode_memory.py`` counts the cache-sized buffers of the compiled step).

    Example:
        >>> cfg = LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32,
        ...                   num_hidden_layers=2, num_attention_heads=2)
        >>> params = llama.init_params(jax.random.key(0), cfg)
        >>> ids = jnp.ones((1, 3), jnp.int32)
        >>> _, cache = prefill(params, cfg, ids, jnp.ones_like(ids), KVCache.create(cfg, 1, 4))
        >>> logits, cache = decode_step(params, cfg, jnp.array([5]), cache)
        >>> logits.shape, int(cache.length)
        ((1, 32), 4)
    """
    ids = tokens[:, None]
    logits, cache = llama.forward(
        params, cfg, ids, attention_mask=jnp.ones_like(ids), cache=cache, ctx=ctx
    )
    return logits[:, 0], cache


def generate(
    params: Params,
    cfg: LlamaConfig,
    input_ids: Any,
    attention_mask: Any = None,
    *,
    max_new_tokens: int,
    temperature: float = 0.0,
    top_p: float = 1.0,
    top_k: int = 0,
    stop_tokens: Sequence[int] | None = None,
    pad_token_id: int | None = None,
    rng: jax.Array | None = None,
    adapter_ids: Any = None,
    task_ids: Any = None,
    dtype: jnp.dtype | str | None = None,
    merge_adapters: bool = True,
) -> GenerationResult:
    """Continue each prompt row by up to ``max_new_tokens`` tokens.

    Args:
        input_ids: int ``[B, T]`` prompts, left- or right-padded (NumPy or JAX).
        attention_mask: int ``[B, T]``, 0 marks padding (default: all valid).
        max_new_tokens: tokens to generate per row (the loop stops early once
            every row produced a stop token).
        temperature: 0 for greedy decoding; otherwise sample from
            ``softmax(logits / temperature)`` after the top-k and top-p filters.
        top_p: nucleus mass in ``(0, 1]`` (1: no filter). Sampling only.
        top_k: keep the ``top_k`` most likely tokens (0: all). Sampling only.
        stop_tokens: ids that end a row (kept in its output); default ``cfg.eos_ids``.
        pad_token_id: fills a row after its stop token; default ``cfg.pad_token_id``,
            else the first stop token, else 0.
        rng: ``jax.random`` key, required when ``temperature > 0``.
        adapter_ids, task_ids: int ``[B]`` per-row adapter / task (multi-adapter and
            multi-task methods), passed to every forward call through the Context.
        dtype: compute and cache dtype; default (None or ``"auto"``): bfloat16 on
            GPU/TPU, float32 on CPU (:func:`jpeft.models.context.compute_dtype`).
        merge_adapters: without ``adapter_ids``, merge LoRA-like nodes into their
            weights for this call (:func:`merge_for_decoding`; device memory then
            holds a merged copy of each adapted weight besides the stored params).

    Raises:
        ValueError: a shape, a row without any valid token, a setting or an adapter id
            out of range.

    Example:
        >>> cfg = LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32,
        ...                   num_hidden_layers=2, num_attention_heads=2)
        >>> params = llama.init_params(jax.random.key(0), cfg)
        >>> out = generate(params, cfg, jnp.ones((2, 3), jnp.int32), max_new_tokens=4)
        >>> out.tokens.shape, out.lengths.shape
        ((2, 4), (2,))
    """
    input_ids = np.asarray(input_ids)
    if input_ids.ndim != 2:
        raise ValueError(f"input_ids: expected shape [B, T], found {input_ids.shape}")
    b, t = input_ids.shape
    mask = np.ones((b, t), np.int32) if attention_mask is None else np.asarray(attention_mask)
    _check_inputs(input_ids, mask, adapter_ids, task_ids)
    if adapter_ids is not None:
        check_adapter_ids(params, adapter_ids)
    _check_settings(max_new_tokens, temperature, top_p, top_k, rng)
    stops = cfg.eos_ids if stop_tokens is None else tuple(int(s) for s in stop_tokens)
    if pad_token_id is None:
        pad_token_id = cfg.pad_token_id
    if pad_token_id is None:
        pad_token_id = stops[0] if stops else 0
    rows, width = bucket(b), bucket(t, PROMPT_BUCKET)
    padded_mask = _pad(mask, rows, width, 0)
    padded_mask[b:, -1] = 1  # rows added to fill the bucket attend to one token; dropped below
    result = _generate(
        params,
        _pad(input_ids, rows, width, pad_token_id),
        padded_mask,
        np.arange(rows) < b,
        np.asarray(stops, np.int32).reshape(-1),
        np.int32(pad_token_id),
        np.float32(max(temperature, 0.0)),
        np.float32(top_p),
        rng,
        None if adapter_ids is None else _pad_rows(adapter_ids, rows, -1),
        None if task_ids is None else _pad_rows(task_ids, rows, 0),
        cfg=cfg,
        max_new_tokens=int(max_new_tokens),
        is_greedy=temperature == 0.0,
        top_k=int(top_k),
        use_top_p=top_p < 1.0,
        dtype=compute_dtype(dtype),
        merge=merge_adapters and adapter_ids is None,
    )
    if rows == b:
        return result
    return GenerationResult(tokens=result.tokens[:b], lengths=result.lengths[:b])


def _pad(a: np.ndarray, rows: int, width: int, value: int) -> np.ndarray:
    """``a [B, T]`` as int32 ``[rows, width]``: ``value`` in added columns (left) and rows."""
    b, t = a.shape
    out = np.full((rows, width), value, np.int32)
    out[:b, width - t :] = a
    return out


def _pad_rows(ids: Any, rows: int, value: int) -> np.ndarray:
    """Per-row ids ``[B]`` as int32 ``[rows]``, added rows set to ``value``."""
    ids = np.asarray(ids, np.int32)
    return np.concatenate([ids, np.full(rows - ids.shape[0], value, np.int32)])


def _check_inputs(
    input_ids: np.ndarray, attention_mask: np.ndarray, adapter_ids: Any, task_ids: Any
) -> None:
    b, t = input_ids.shape
    if t == 0:
        raise ValueError("input_ids: the prompt length is 0; expected at least one token")
    if attention_mask.shape != (b, t):
        raise ValueError(
            f"attention_mask: expected shape {(b, t)} like input_ids, found {attention_mask.shape}"
        )
    for name, ids in (("adapter_ids", adapter_ids), ("task_ids", task_ids)):
        if ids is not None and np.shape(ids) != (b,):
            raise ValueError(f"{name}: expected shape {(b,)}, found {np.shape(ids)}")
    empty = np.flatnonzero(attention_mask.sum(axis=1) == 0)
    if empty.size:
        raise ValueError(
            f"attention_mask: rows {empty.tolist()} have no valid token; "
            "expected at least one per row"
        )


def _check_settings(max_new_tokens, temperature, top_p, top_k, rng) -> None:
    if int(max_new_tokens) < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens}; expected >= 1")
    if temperature < 0:
        raise ValueError(f"temperature={temperature}; expected >= 0 (0 = greedy)")
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p={top_p}; expected a value in (0, 1]")
    if top_k < 0:
        raise ValueError(f"top_k={top_k}; expected >= 0 (0 = no top-k filter)")
    if temperature > 0 and rng is None:
        raise ValueError("rng: temperature > 0 samples tokens and needs a jax.random key")


@functools.partial(
    jax.jit,
    static_argnames=(
        "cfg",
        "max_new_tokens",
        "is_greedy",
        "top_k",
        "use_top_p",
        "dtype",
        "merge",
    ),
)
def _generate(
    params: Params,
    input_ids: jax.Array,
    attention_mask: jax.Array,
    active: jax.Array,
    stops: jax.Array,
    pad: jax.Array,
    temperature: jax.Array,
    top_p: jax.Array,
    rng: jax.Array | None,
    adapter_ids: jax.Array | None,
    task_ids: jax.Array | None,
    *,
    cfg: LlamaConfig,
    max_new_tokens: int,
    is_greedy: bool,
    top_k: int,
    use_top_p: bool,
    dtype: jnp.dtype,
    merge: bool,
) -> GenerationResult:
    """The generation loop; ``active [B]`` is False for rows added to fill a batch bucket."""
    b, t = input_ids.shape
    if merge:
        params = merge_for_decoding(params)
    ctx = Context(dtype, adapter_ids=adapter_ids, task_ids=task_ids)
    slots = virtual_tokens(params, b, ctx) + t + max_new_tokens - 1
    cache = KVCache.create(cfg, b, slots, dtype)

    def choose(logits: jax.Array, step: jax.Array) -> jax.Array:
        if is_greedy:
            return sampling.greedy(logits)
        key = jax.random.fold_in(rng, step)
        return sampling.sample(
            key, logits, temperature=temperature, top_p=top_p, top_k=top_k, use_top_p=use_top_p
        )

    def is_stop(tok: jax.Array) -> jax.Array:
        return jnp.any(tok[:, None] == stops[None, :], axis=1)

    logits, cache = prefill(params, cfg, input_ids, attention_mask, cache, ctx)
    first = choose(logits, jnp.zeros((), jnp.int32))
    tokens = jnp.full((b, max_new_tokens), pad, jnp.int32).at[:, 0].set(first)
    done = is_stop(first) | ~active
    state = (jnp.ones((), jnp.int32), tokens, first, done, active.astype(jnp.int32))

    def cond(carry):
        (step, _, _, done, _), _ = carry
        return (step < max_new_tokens) & ~jnp.all(done)

    def body(carry):
        (step, tokens, last, done, lengths), cache = carry
        logits, cache = decode_step(params, cfg, last, cache, ctx)
        nxt = jnp.where(done, pad, choose(logits, step))
        tokens = jax.lax.dynamic_update_slice(tokens, nxt[:, None], (0, step))
        lengths = lengths + (~done).astype(jnp.int32)
        return (step + 1, tokens, nxt, done | is_stop(nxt), lengths), cache

    (_, tokens, _, _, lengths), _ = jax.lax.while_loop(cond, body, (state, cache))
    return GenerationResult(tokens=tokens, lengths=lengths)
