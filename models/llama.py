"""The LLaMA decoder as a pure function of a params pytree, and its Flax module.

The params layout (every leaf's path, shape, logical axes and HF name) is
:data:`jpeft.models.param_spec.LAYOUT`, printed by :func:`jpeft.models.param_spec.describe`;
entries under ``layers`` carry a leading ``num_hidden_layers`` axis. PEFT methods add
optional entries read through :mod:`jpeft.models.hooks`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from jpeft.models import hooks, param_spec, selection
from jpeft.models.attention import CausalMask, check_implementation
from jpeft.models.cache import KVCache
from jpeft.models.config import LlamaConfig
from jpeft.models.context import Context
from jpeft.models.flash_attention import RESIDUALS
from jpeft.models.layers import decoder_layer, rms_norm
from jpeft.models.linear import linear, lookup, tied_logits
from jpeft.models.pytree import Params, put_path
from jpeft.models.rope import rotary_tables

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# The name of each layer's input (the scan's carry), which every policy keeps; the
# offloading policies keep it in host memory (at 1.1B, B=4 x T=2048: 0.7 GB off the device).
LAYER_INPUT = "layer_input"


def _saving(*names: str, offload: bool = False) -> Callable[..., Any]:
    if not offload:
        return jax.checkpoint_policies.save_only_these_names(*names)
    return jax.checkpoint_policies.save_and_offload_only_these_names(
        names_which_can_be_saved=[],
        names_which_can_be_offloaded=list(names),
        offload_src="device",
        offload_dst="pinned_host",
    )


# What each layer keeps for its backward pass (the rest is recomputed there):
#   none: everything; full: nothing (the layer input only); dots: matmul outputs;
#   proj: the projection outputs (named by jpeft.models.linear.linear), so attention,
#     norms and elementwise work are recomputed;
#   proj_attn: also the fused attention's output and log-sum-exp (RESIDUALS), so only
#     norms and elementwise work are recomputed (the XLA path still recomputes attention);
#   *_offload: the same values and each layer's input (LAYER_INPUT), kept in host memory
#     (pinned_host) between the passes.
REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "proj": _saving(*PROJECTIONS),
    "proj_attn": _saving(*PROJECTIONS, *RESIDUALS),
    "proj_offload": _saving(LAYER_INPUT, *PROJECTIONS, offload=True),
    "proj_attn_offload": _saving(LAYER_INPUT, *PROJECTIONS, *RESIDUALS, offload=True),
}
# The training default (RunConfig.remat), chosen by bench/remat.py on the 1.1B LoRA step
# compiled for an H100: device peak as low as "full" with the FLOPs of "proj_attn".
DEFAULT_REMAT = "proj_attn_offload"


def forward(
    params: Params,
    cfg: LlamaConfig,
    input_ids: jax.Array | None = None,
    *,
    inputs_embeds: jax.Array | None = None,
    attention_mask: jax.Array | None = None,
    position_ids: jax.Array | None = None,
    segment_ids: jax.Array | None = None,
    cache: KVCache | None = None,
    ctx: Context | None = None,
    remat: str = "none",
    attention_impl: str = "auto",
    return_hidden: bool = False,
) -> jax.Array | tuple[jax.Array, KVCache]:
    """Logits ``[B, T, vocab]`` aligned with ``input_ids [B, T]`` (or ``inputs_embeds``).

    Args:
        inputs_embeds: float ``[B, T, hidden]`` input embeddings instead of ``input_ids``
            (exactly one of the two), as transformers' ``inputs_embeds=``; soft prompts
            are still prepended to them.
        attention_mask: int ``[B, T]``, 0 marks padding (left or right).
        position_ids: explicit RoPE positions of the real tokens; by default each
            token's position is the number of valid tokens before it.
        segment_ids: int ``[B, T]`` for packed rows: tokens attend only within their
            segment (0 = padding). Pass ``position_ids`` restarting per segment too.
        cache: a :class:`KVCache`; when given, returns ``(logits, new_cache)``.
        ctx: compute dtype, dropout key, per-row adapter/task ids, and
            ``disable_adapters`` (:func:`jpeft.models.selection.for_call`: concrete
            adapter ids out of range raise ``ValueError``).
        remat: what each layer saves for the backward pass, a key of
            :data:`REMAT_POLICIES` (``"none"`` saves everything).
        attention_impl: ``"auto"``, ``"xla"``, ``"cudnn"`` or ``"pallas"``
            (:mod:`jpeft.models.attention`); decoding with a cache always uses XLA.
        return_hidden: return the final normed hidden states ``[B, T, hidden]``
            instead of logits (:func:`lm_head` maps them to logits).

    Example:
        >>> cfg = LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32,
        ...                   num_hidden_layers=2, num_attention_heads=2)
        >>> params = init_params(jax.random.key(0), cfg)
        >>> forward(params, cfg, jnp.zeros((1, 5), jnp.int32)).shape
        (1, 5, 32)
    """
    if remat not in REMAT_POLICIES:
        raise ValueError(f"remat={remat!r}; expected one of {sorted(REMAT_POLICIES)}")
    check_implementation(attention_impl)
    ctx = ctx or Context()
    params = selection.for_call(params, ctx)
    x = embed(params, cfg, input_ids, inputs_embeds, ctx).astype(ctx.dtype)
    b, t = x.shape[:2]
    mask = jnp.ones((b, t), jnp.int32) if attention_mask is None else attention_mask
    mask = mask.astype(jnp.int32)
    peft = hooks.method_inputs(params, b, ctx, prefill=cache is None or not cache.started)
    x, mask, position_ids, n_prompt = _prepend_prompt(
        peft.prompt, x, mask, position_ids, segment_ids
    )

    extras: dict[str, jax.Array] = {}
    n_prefix = 0
    if peft.prefix is not None:
        extras["prefix_k"], extras["prefix_v"] = peft.prefix
        n_prefix = peft.prefix[0].shape[2]

    past = 0 if cache is None else jnp.sum(cache.mask, axis=1, keepdims=True)
    if position_ids is None:
        position_ids = jnp.maximum(past + jnp.cumsum(mask, axis=1) - 1, 0)
    positions = position_ids + n_prefix
    rope = rotary_tables(cfg, positions)

    if cache is None:
        attn_mask = CausalMask(mask, segment_ids)
    else:
        if x.shape[1] > cache.max_len:
            raise ValueError(f"{x.shape[1]} tokens do not fit a cache of {cache.max_len} slots")
        new_mask = jax.lax.dynamic_update_slice(cache.mask, mask, (0, cache.length))
        attn_mask = _cached_mask(new_mask, cache.length, x.shape[1])

    per_layer = {"layer": params["layers"], "nodes": peft.per_layer, **extras}
    x, stacked = _run_layers(per_layer, cfg, x, rope, attn_mask, cache, ctx, remat, attention_impl)
    x = rms_norm(params["norm"]["scale"], x, cfg.rms_norm_eps, ctx.dtype)[:, n_prompt:]
    logits = x if return_hidden else lm_head(params, cfg, x, ctx)
    if cache is None:
        return logits
    new_cache = KVCache(
        k=stacked[0],
        v=stacked[1],
        mask=new_mask,
        length=cache.length + mask.shape[1],
        started=True,
    )
    return logits, new_cache


def embed(
    params: Params,
    cfg: LlamaConfig,
    input_ids: jax.Array | None,
    inputs_embeds: jax.Array | None,
    ctx: Context,
) -> jax.Array:
    """Input embeddings ``[B, T, hidden]``: looked up from ``input_ids [B, T]``, or given.

    Raises ``ValueError`` unless exactly one of the two is given, or for
    ``inputs_embeds`` not of shape ``[B, T, hidden]``.

    Example:
        >>> cfg = LlamaConfig(vocab_size=3, hidden_size=3, intermediate_size=4,
        ...                   num_hidden_layers=1, num_attention_heads=1)
        >>> params = {"embed_tokens": {"embedding": jnp.eye(3)}}
        >>> embed(params, cfg, jnp.array([[2, 0]]), None, Context()).tolist()
        [[[0.0, 0.0, 1.0], [1.0, 0.0, 0.0]]]
    """
    if (input_ids is None) == (inputs_embeds is None):
        raise ValueError("forward: pass exactly one of input_ids and inputs_embeds")
    if input_ids is not None:
        return lookup(params["embed_tokens"]["embedding"], input_ids, ctx)
    hidden = cfg.hidden_size
    if inputs_embeds.ndim != 3 or inputs_embeds.shape[-1] != hidden:
        raise ValueError(
            f"inputs_embeds: expected shape [B, T, {hidden}], found {tuple(inputs_embeds.shape)}"
        )
    return inputs_embeds


def _prepend_prompt(
    prompt: jax.Array | None,
    x: jax.Array,
    mask: jax.Array,
    position_ids: jax.Array | None,
    segment_ids: jax.Array | None,
) -> tuple[jax.Array, jax.Array, jax.Array | None, int]:
    """Virtual tokens ``prompt [B, n, H]`` before ``x``: ``(x, mask, position_ids, n)``."""
    if prompt is None:
        return x, mask, position_ids, 0
    if segment_ids is not None:
        raise ValueError("soft prompts cannot be combined with packed rows (segment_ids)")
    b, n = prompt.shape[:2]
    x = jnp.concatenate([prompt.astype(x.dtype), x], axis=1)
    mask = jnp.concatenate([jnp.ones((b, n), jnp.int32), mask], axis=1)
    if position_ids is not None:
        virtual = jnp.broadcast_to(jnp.arange(n), (b, n))
        position_ids = jnp.concatenate([virtual, position_ids + n], axis=1)
    return x, mask, position_ids, n


def lm_head(
    params: Params, cfg: LlamaConfig, x: jax.Array, ctx: Context | None = None
) -> jax.Array:
    """Logits ``[..., vocab]`` of final normed hidden states ``x [..., hidden]``.

    The output embedding, or the input embedding when ``cfg.tie_word_embeddings``
    (:func:`jpeft.models.linear.tied_logits` of its node: a LoRA on ``embed_tokens``
    adapts the input only and a LoRA on the tied ``lm_head`` the output only, as peft's do).

    Example:
        >>> cfg = LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32,
        ...                   num_hidden_layers=2, num_attention_heads=2)
        >>> lm_head(init_params(jax.random.key(0), cfg), cfg, jnp.ones((3, 16))).shape
        (3, 32)
    """
    ctx = ctx or Context()
    if cfg.tie_word_embeddings:
        return tied_logits(params["embed_tokens"]["embedding"], x, ctx)
    return linear(params["lm_head"], x, ctx, "lm_head")


def _cached_mask(slot_valid: jax.Array, length: jax.Array, t: int) -> jax.Array:
    slots = jnp.arange(slot_valid.shape[1])
    query_slots = length + jnp.arange(t)
    causal = slots[None, :] <= query_slots[:, None]
    return causal[None] & (slot_valid[:, None, :] > 0)


def _to_device(x: jax.Array) -> jax.Array:
    """``x`` in device memory: a layer's slice of params kept in host memory (a paged train
    step's trainable layers, whose gradients then stack up in host memory) comes in here."""
    if jax.typeof(x).memory_space == jax.memory.Space.Host:
        return jax.device_put(x, jax.memory.Space.Device)
    return x


def _run_layers(per_layer, cfg, x, rope, attn_mask, cache, ctx, remat, attention_impl):
    """One scan over all layers; ``per_layer`` holds the layer params and every per-layer input.

    ``per_layer["layer"]`` are the stacked layer params, ``per_layer["nodes"]`` the
    PEFT nodes with a leading layer axis, and the rest (prefix keys/values) per-layer
    arrays; each step gets the slice of all of them for its layer (moved to device memory
    where the stack is in host memory). The KV cache is not
    sliced: its stacked keys and values ride in the scan carry and each layer writes
    its new entries into them in place (:func:`jpeft.models.cache.write_layer`).
    Returns the hidden states and the updated ``(keys, values)`` (None without a cache).
    """
    xs = {**per_layer, "index": jnp.arange(cfg.num_hidden_layers)}

    def body(carry, xs):
        h, stacked = carry
        xs = jax.tree.map(_to_device, xs)
        kv = {k: v for k, v in xs.items() if k not in ("layer", "index")}
        if cache is not None:
            kv.update(cache=stacked, layer=xs["index"], length=cache.length)
        ctx_layer = ctx.for_layer(xs["index"])
        h = checkpoint_name(h, LAYER_INPUT)
        layer_out = decoder_layer(
            xs["layer"], h, rope, attn_mask, cfg, ctx_layer, kv, attention_impl
        )
        return layer_out, None

    if remat != "none":
        body = jax.checkpoint(body, policy=REMAT_POLICIES[remat], prevent_cse=False)
    stacked = None if cache is None else (cache.k, cache.v)
    (x, stacked), _ = jax.lax.scan(body, (x, stacked), xs)
    return x, stacked


def init_params(key: jax.Array, cfg: LlamaConfig, dtype: jnp.dtype = jnp.float32) -> Params:
    """Random base params (normal std 0.02, unit norms, zero biases), as HF initializes LLaMA.

    Every leaf comes from its :class:`jpeft.models.param_spec.ParamSpec`.

    Example:
        >>> cfg = LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32,
        ...                   num_hidden_layers=2, num_attention_heads=2)
        >>> init_params(jax.random.key(0), cfg)["layers"]["mlp"]["up_proj"]["kernel"].shape
        (2, 16, 32)
    """
    drawn = param_spec.random_leaves()
    keys = dict(zip(drawn, jax.random.split(key, len(drawn)), strict=True))
    params: Params = {}
    for spec in param_spec.specs(cfg):
        put_path(params, spec.path, spec.initial(keys.get(spec), cfg, dtype))
    return params


class Llama(nn.Module):
    """Flax module around :func:`forward`; its params are the pytree above.

    ``remat`` (a key of :data:`REMAT_POLICIES`) and ``attention_impl`` (auto, xla,
    cudnn or pallas) are passed to :func:`forward`. ``return_hidden=True`` returns the
    final hidden states; :meth:`logits` maps them to logits (the chunked loss of
    :func:`jpeft.train.train_step` uses both).

    A call takes ``input_ids [B, T]`` or ``inputs_embeds=[B, T, hidden]``;
    ``adapter_ids=[B]`` picks a named adapter per row (-1: none; concrete ids out of
    range raise ``ValueError``, see :mod:`jpeft.models.selection` for jit);
    ``disable_adapters=True`` runs the base model alone, as peft's ``disable_adapter()``.

    Example:
        >>> cfg = LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32,
        ...                   num_hidden_layers=2, num_attention_heads=2)
        >>> model = Llama(cfg, attention_impl="xla")
        >>> ids = jnp.zeros((1, 4), jnp.int32)
        >>> params = model.init(jax.random.key(0), ids)["params"]
        >>> model.apply({"params": params}, ids).shape
        (1, 4, 32)
        >>> hidden = model.apply({"params": params}, ids, return_hidden=True)
        >>> model.apply({"params": params}, hidden, method="logits").shape
        (1, 4, 32)
    """

    cfg: LlamaConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    remat: str = "none"
    attention_impl: str = "auto"

    @nn.compact
    def __call__(
        self,
        input_ids: jax.Array | None = None,
        attention_mask: jax.Array | None = None,
        position_ids: jax.Array | None = None,
        segment_ids: jax.Array | None = None,
        cache: KVCache | None = None,
        adapter_ids: jax.Array | None = None,
        task_ids: jax.Array | None = None,
        deterministic: bool = True,
        return_hidden: bool = False,
        inputs_embeds: jax.Array | None = None,
        disable_adapters: bool = False,
    ) -> jax.Array | tuple[jax.Array, KVCache]:
        if self.is_initializing():
            base = init_params(self.make_rng("params"), self.cfg, self.param_dtype)
            for name, value in base.items():
                self.param(name, lambda _, v=value: v)
        ctx = self._context(adapter_ids, task_ids, deterministic, disable_adapters)
        return forward(
            self.variables["params"],
            self.cfg,
            input_ids,
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            position_ids=position_ids,
            segment_ids=segment_ids,
            cache=cache,
            ctx=ctx,
            remat=self.remat,
            attention_impl=self.attention_impl,
            return_hidden=return_hidden,
        )

    def logits(
        self,
        hidden: jax.Array,
        adapter_ids: jax.Array | None = None,
        task_ids: jax.Array | None = None,
        deterministic: bool = True,
        disable_adapters: bool = False,
    ) -> jax.Array:
        """:func:`lm_head` of hidden states ``[B, T, hidden]`` from ``return_hidden=True``.

        Call it as ``model.apply(variables, hidden, method="logits")``.
        """
        ctx = self._context(adapter_ids, task_ids, deterministic, disable_adapters)
        params = selection.for_call(self.variables["params"], ctx)
        return lm_head(params, self.cfg, hidden, ctx)

    def _context(
        self,
        adapter_ids: jax.Array | None,
        task_ids: jax.Array | None,
        deterministic: bool,
        disable_adapters: bool,
    ) -> Context:
        rng = None if deterministic else self.make_rng("dropout")
        return Context(
            self.dtype,
            rng=rng,
            adapter_ids=adapter_ids,
            task_ids=task_ids,
            disable_adapters=disable_adapters,
        )
