"""LLaMA-Adapter (Zhang et al. 2023), peft's "adaption prompt".

In each of the top ``adapter_layers`` layers a learnable prompt of
``adapter_len`` tokens goes through that layer's own k/v projections (no RoPE).
The layer's rotated queries attend to it with a separate softmax, scaled by a
zero-initialized gate; the result goes through ``o_proj`` and is added to the
attention output. A zero gate means training starts from the base model.

The node holds every layer (``layer_mask`` is 1 in the top ones only), so the
forward pass scans all layers once; the adapter file holds the top layers' tensors
only, as peft's.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np

from jpeft.adapter_files import AdapterConfig, AdapterTensors, peft_module
from jpeft.method import Method, register
from jpeft.models.config import LlamaConfig
from jpeft.models.context import Context
from jpeft.models.linear import linear
from jpeft.models.pytree import Params
from jpeft.models.rope import apply_rotary_apart
from jpeft.nodes import Node, layer_mask, masked_layers, node
from jpeft.prompts.nodes import entry_node


@node(trainable=("prompt", "gate"), decay=())
class AdaptionPrompt(Node):
    """Prompts ``[L, adapter_len, hidden]`` and gates ``[L, 1]``, used where ``layer_mask [L]``.

    Layers outside the mask (:func:`jpeft.nodes.layer_mask`) hold zeros that get zero
    gradient. Nothing in it takes weight decay.
    """

    prompt: jax.Array
    gate: jax.Array
    layer_mask: jax.Array

    per_layer: ClassVar[bool] = True

    def adaption_output(
        self, q: jax.Array, rope: tuple[jax.Array, jax.Array], attn: dict[str, Any], ctx: Context
    ) -> jax.Array:
        """The gated prompt attention of one layer (``self`` holds that layer's slice).

        ``q`` are the layer's queries before RoPE; they are rotated here apart from the
        attention's own rotation, so a zero gate gives the base model bit for bit.
        """
        q = apply_rotary_apart(q, *rope)
        b, t, heads, d = q.shape
        prompt = self.prompt.astype(ctx.dtype)  # [adapter_len, hidden] inside the scan
        k = linear(attn["k_proj"], prompt, ctx, "k_proj").reshape(prompt.shape[0], -1, d)
        v = linear(attn["v_proj"], prompt, ctx, "v_proj").reshape(prompt.shape[0], -1, d)
        groups = heads // k.shape[1]
        k, v = jnp.repeat(k, groups, axis=1), jnp.repeat(v, groups, axis=1)  # [len, heads, d]
        scores = jnp.einsum("bthd,lhd->bhtl", q, k.astype(q.dtype)) / np.sqrt(d)
        probs = jax.nn.softmax(scores.astype(jnp.float32), axis=-1).astype(q.dtype)
        probs = (self.gate * self.layer_mask).astype(q.dtype) * probs
        out = jnp.einsum("bhtl,lhd->bthd", probs, v.astype(q.dtype)).reshape(b, t, heads * d)
        return linear(attn["o_proj"], out, ctx, "o_proj")


@register
@dataclasses.dataclass(frozen=True)
class LlamaAdapter(Method):
    """LLaMA-Adapter: gated adaption prompts in the top ``adapter_layers`` layers.

    Example:
        >>> method = LlamaAdapter(adapter_len=10, adapter_layers=2)
        >>> from jpeft.models import hf, llama
        >>> cfg, base = hf.load_pretrained("assets/tiny-llama")
        >>> params = method.init(jax.random.key(0), base, cfg)
        >>> import jpeft
        >>> sum(leaf.size for leaf in jax.tree.leaves(jpeft.split(params)[0]))  # trainable
        5124
    """

    peft_type: ClassVar[str] = "ADAPTION_PROMPT"

    adapter_len: int = 10
    adapter_layers: int = 1

    def _check(self, cfg: LlamaConfig) -> None:
        if self.adapter_len <= 0:
            raise ValueError(f"LlamaAdapter: adapter_len={self.adapter_len} must be positive")
        if not 0 < self.adapter_layers <= cfg.num_hidden_layers:
            raise ValueError(
                f"LlamaAdapter: adapter_layers={self.adapter_layers} must be in "
                f"1..{cfg.num_hidden_layers}"
            )

    def init(self, key: jax.Array, params: Params, cfg: LlamaConfig) -> Params:
        self._check(cfg)
        if "adaption" in params:
            raise ValueError("LlamaAdapter: params already hold adaption prompts")
        n, top = cfg.num_hidden_layers, self._top_layers(cfg)
        shape = (self.adapter_layers, self.adapter_len, cfg.hidden_size)
        drawn = jax.random.normal(key, shape, jnp.float32)  # peft: normal(0, 1)
        prompt = jnp.zeros((n, *shape[1:]), jnp.float32).at[top.start :].set(drawn)
        mask = layer_mask(top, n, "LlamaAdapter")
        gate = jnp.zeros((n, 1), jnp.float32)
        return {**params, "adaption": AdaptionPrompt(prompt=prompt, gate=gate, layer_mask=mask)}

    def _top_layers(self, cfg: LlamaConfig) -> range:
        return range(cfg.num_hidden_layers - self.adapter_layers, cfg.num_hidden_layers)

    def adapter_config(self, cfg: LlamaConfig) -> dict[str, Any]:
        return {
            "peft_type": self.peft_type,
            "adapter_len": self.adapter_len,
            "adapter_layers": self.adapter_layers,
            "target_modules": "self_attn",
        }

    def adapter_tensors(self, params: Params, cfg: LlamaConfig) -> dict[str, np.ndarray]:
        adaption = entry_node(params, "adaption", (AdaptionPrompt,), "LlamaAdapter")
        out = {}
        for layer in masked_layers(adaption.layer_mask):
            prefix = peft_module(layer, "self_attn")
            out[f"{prefix}.adaption_prompt"] = np.asarray(adaption.prompt[layer])[None]
            out[f"{prefix}.adaption_gate"] = np.asarray(adaption.gate[layer])
        return out

    @classmethod
    def read_adapter(
        cls, config: AdapterConfig, tensors: AdapterTensors, params: Params, cfg: LlamaConfig
    ) -> tuple[LlamaAdapter, Params]:
        if config.get("target_modules", str, "self_attn") != "self_attn":
            raise config.error("target_modules", "'self_attn'")
        method = cls(
            adapter_len=config.require("adapter_len", int),
            adapter_layers=config.require("adapter_layers", int),
        )
        method._check(cfg)
        n, top = cfg.num_hidden_layers, method._top_layers(cfg)
        prompts = np.zeros((n, method.adapter_len, cfg.hidden_size), np.float32)
        gates = np.zeros((n, 1), np.float32)
        for layer in top:
            prefix = peft_module(layer, "self_attn")
            shape = (1, method.adapter_len, cfg.hidden_size)
            prompts[layer] = tensors.take(f"{prefix}.adaption_prompt", shape)[0]
            gates[layer] = tensors.take(f"{prefix}.adaption_gate", (1,))
        adaption = AdaptionPrompt(
            prompt=jnp.asarray(prompts),
            gate=jnp.asarray(gates),
            layer_mask=layer_mask(top, n, "LlamaAdapter"),
        )
        return method, {**params, "adaption": adaption}
