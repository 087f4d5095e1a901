"""Prefix tuning (Li & Liang 2021) and P-tuning v2 (Liu et al. 2022): deep prompts.

Every layer attends to ``num_virtual_tokens`` trainable keys and values placed
before the real tokens (the model gives them mask ones and starts the real
tokens' RoPE positions at ``num_virtual_tokens``, as transformers does with
peft's prefix cache). Widths follow the key/value heads, so GQA models get
``kv_heads * head_dim`` per token and layer.

Both export as peft's ``PREFIX_TUNING``. Loading an adapter saved with
``prefix_projection=True`` gives a plain (non-reparameterized) prefix holding the
saved projection output, and a method with ``prefix_projection=False``: peft
saves only that output.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np

from jpeft.adapter_files import AdapterConfig, AdapterTensors
from jpeft.method import Method, register
from jpeft.models.config import LlamaConfig
from jpeft.models.pytree import Params
from jpeft.prompts import encoders, peft_io
from jpeft.prompts.nodes import Prefix, ProjectedPrefix, install, table_tensors


@register
@dataclasses.dataclass(frozen=True)
class PrefixTuning(Method):
    """Per-layer key/value prefixes, reparameterized by an MLP by default (the paper's recipe).

    Args:
        num_virtual_tokens: prefix length.
        prefix_projection: train ``Embedding(n, kv_dim) -> Linear(kv_dim, h) -> tanh ->
            Linear(h, layers * 2 * kv_dim)`` instead of the prefix itself.
        encoder_hidden_size: ``h`` (peft's default: ``kv_dim = kv_heads * head_dim``).
        init_weights: ``None`` (random, standard normal prefix as peft) or ``"zero"``
            (zero prefix / zero last projection layer).

    Example:
        >>> method = PrefixTuning(num_virtual_tokens=10, encoder_hidden_size=512)
        >>> from jpeft.models import hf, llama
        >>> cfg, base = hf.load_pretrained("assets/tiny-llama")
        >>> params = method.init(jax.random.key(0), base, cfg)
        >>> type(params["prefix"]).__name__
        'ProjectedPrefix'
    """

    peft_type: ClassVar[str] = "PREFIX_TUNING"

    num_virtual_tokens: int = 20
    prefix_projection: bool = True
    encoder_hidden_size: int | None = None
    init_weights: str | None = None

    def __post_init__(self) -> None:
        owner = type(self).__name__
        peft_io.check_virtual_tokens(owner, self.num_virtual_tokens)
        if self.init_weights not in (None, "zero"):
            raise ValueError(f"{owner}: init_weights={self.init_weights!r}; valid: None, 'zero'")
        if self.encoder_hidden_size is not None and self.encoder_hidden_size <= 0:
            raise ValueError(f"{owner}: encoder_hidden_size={self.encoder_hidden_size} must be > 0")

    def hidden_size(self, cfg: LlamaConfig) -> int:
        """The projection width (peft's default: the key/value width of one layer)."""
        return self.encoder_hidden_size or peft_io.prefix_token_dim(cfg)

    def init(self, key: jax.Array, params: Params, cfg: LlamaConfig) -> Params:
        n, kv_dim = self.num_virtual_tokens, peft_io.prefix_token_dim(cfg)
        width = cfg.num_hidden_layers * 2 * kv_dim
        heads = {"kv_heads": cfg.num_key_value_heads, "head_dim": cfg.head_dim}
        k_embed, k_enc = jax.random.split(key)
        zero = self.init_weights == "zero"
        if not self.prefix_projection:
            embedding = jax.random.normal(k_embed, (n, width), jnp.float32)
            return install(
                params, "prefix", Prefix(jnp.zeros_like(embedding) if zero else embedding, **heads)
            )
        encoder = encoders.init_projection(k_enc, kv_dim, self.hidden_size(cfg), width)
        if zero:
            encoder["output"] = jax.tree.map(jnp.zeros_like, encoder["output"])
        embedding = jax.random.normal(k_embed, (n, kv_dim), jnp.float32)
        return install(params, "prefix", ProjectedPrefix(embedding, encoder, **heads))

    def adapter_config(self, cfg: LlamaConfig) -> dict[str, Any]:
        return {
            "peft_type": self.peft_type,
            **peft_io.model_keys(cfg, self.num_virtual_tokens, prefix=True),
            "prefix_projection": self.prefix_projection,
            "encoder_hidden_size": self.hidden_size(cfg),
            "init_weights": self.init_weights,
        }

    def adapter_tensors(self, params: Params, cfg: LlamaConfig) -> dict[str, np.ndarray]:
        return table_tensors(params, "prefix", (Prefix, ProjectedPrefix), type(self).__name__)

    @classmethod
    def read_adapter(
        cls, config: AdapterConfig, tensors: AdapterTensors, params: Params, cfg: LlamaConfig
    ) -> tuple[PrefixTuning, Params]:
        n = peft_io.check_model(config, cfg, prefix=True)
        heads = config.get("num_attention_heads", int)
        if heads not in (None, cfg.num_key_value_heads):
            raise ValueError(
                f"{config.source}: num_attention_heads={heads}; a prefix for this model has "
                f"{cfg.num_key_value_heads} (its key/value heads)"
            )
        width = cfg.num_hidden_layers * 2 * peft_io.prefix_token_dim(cfg)
        table = tensors.take(peft_io.TABLE, (n, width))
        method = cls(
            num_virtual_tokens=n,
            prefix_projection=False,
            encoder_hidden_size=config.get("encoder_hidden_size", int),
            init_weights=config.get("init_weights", str),
        )
        prefix = Prefix(jnp.asarray(table), cfg.num_key_value_heads, cfg.head_dim)
        return method, install(params, "prefix", prefix)


@dataclasses.dataclass(frozen=True)
class PTuningV2(PrefixTuning):
    """P-tuning v2: deep prompts at every layer, i.e. prefix tuning without reparameterization.

    Saved as peft's ``PREFIX_TUNING`` (peft has no separate type), so loading its
    adapter gives a :class:`PrefixTuning` with ``prefix_projection=False``.

    Example:
        >>> method = PTuningV2(num_virtual_tokens=16)
        >>> from jpeft.models import hf, llama
        >>> cfg, base = hf.load_pretrained("assets/tiny-llama")
        >>> params = method.init(jax.random.key(0), base, cfg)
        >>> type(params["prefix"]).__name__
        'Prefix'
    """

    prefix_projection: bool = False
