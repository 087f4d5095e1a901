"""Soft-prompt methods: prompt tuning and P-tuning (v1).

Each adds ``params["prompt"]``: virtual-token embeddings prepended to the input
embeddings (their logits are dropped, so logits stay aligned with ``input_ids``).
Every base weight stays frozen.

Loading a P-tuning adapter gives a plain :class:`SoftPrompt` holding the saved
encoder output: peft saves only that output, the encoder cannot be recovered.
"""

from __future__ import annotations

import dataclasses
import warnings
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np

from jpeft.adapter_files import NUMBER, AdapterConfig, AdapterTensors
from jpeft.method import Method, register
from jpeft.models.config import LlamaConfig
from jpeft.models.pytree import Params
from jpeft.prompts import encoders, peft_io
from jpeft.prompts.nodes import PromptEncoder, SoftPrompt, install, table_tensors
from jpeft.prompts.prompt_init import (
    INITS,
    PromptInit,
    check_init,
    init_options,
    peft_init_keys,
    start_prompt,
)

ENCODER_TYPES = ("MLP", "LSTM")


@register
@dataclasses.dataclass(frozen=True)
class PromptTuning(PromptInit, Method):
    """Prompt tuning (Lester et al. 2021): ``num_virtual_tokens`` trainable embeddings.

    Options: those of :class:`jpeft.prompts.prompt_init.PromptInit`.

    Example:
        >>> from jpeft.models import hf
        >>> from jpeft.models.tokenizer import Tokenizer
        >>> cfg, base = hf.load_pretrained("assets/tiny-llama")
        >>> tok = Tokenizer.from_dir("assets/tiny-llama")
        >>> method = PromptTuning(num_virtual_tokens=8, prompt_init="TEXT",
        ...                       init_text="Sort the digits:", tokenizer=tok)
        >>> params = method.init(jax.random.key(0), base, cfg)
        >>> params["prompt"].embedding.shape  # [num_virtual_tokens, hidden]
        (8, 128)
    """

    peft_type: ClassVar[str] = "PROMPT_TUNING"

    def __post_init__(self) -> None:
        check_init("PromptTuning", self, INITS)

    def init(self, key: jax.Array, params: Params, cfg: LlamaConfig) -> Params:
        return install(params, "prompt", SoftPrompt(start_prompt(self, key, params)))

    def adapter_config(self, cfg: LlamaConfig) -> dict[str, Any]:
        keys = peft_io.model_keys(cfg, self.num_virtual_tokens, prefix=False)
        return {"peft_type": self.peft_type, **keys, **peft_init_keys(self)}

    def adapter_tensors(self, params: Params, cfg: LlamaConfig) -> dict[str, np.ndarray]:
        return table_tensors(params, "prompt", (SoftPrompt,), "PromptTuning")

    @classmethod
    def read_adapter(
        cls, config: AdapterConfig, tensors: AdapterTensors, params: Params, cfg: LlamaConfig
    ) -> tuple[PromptTuning, Params]:
        n, params = _read_soft_prompt(config, tensors, params, cfg)
        return cls(num_virtual_tokens=n, **init_options(config)), params


@register
@dataclasses.dataclass(frozen=True)
class PTuning(Method):
    """P-tuning v1 (Liu et al. 2021): virtual tokens reparameterized by a prompt encoder.

    Trainable: the ``[n, hidden]`` embedding and the encoder (``"MLP"`` or a
    bidirectional ``"LSTM"``, peft's shapes; ``encoder_num_layers`` counts LSTM
    layers and, as in peft, is ignored by the MLP). The adapter file holds only the
    encoder output; loading one gives a plain soft prompt.

    Example:
        >>> method = PTuning(num_virtual_tokens=8, encoder_type="LSTM", encoder_hidden_size=64)
        >>> from jpeft.models import hf, llama
        >>> cfg, base = hf.load_pretrained("assets/tiny-llama")
        >>> params = method.init(jax.random.key(0), base, cfg)
        >>> sorted(params["prompt"].encoder)
        ['head', 'lstm', 'output']
    """

    peft_type: ClassVar[str] = "P_TUNING"

    num_virtual_tokens: int = 20
    encoder_type: str = "MLP"
    encoder_hidden_size: int | None = None
    encoder_num_layers: int = 2
    encoder_dropout: float = 0.0

    def __post_init__(self) -> None:
        peft_io.check_virtual_tokens("PTuning", self.num_virtual_tokens)
        if self.encoder_type not in ENCODER_TYPES:
            raise ValueError(f"PTuning: encoder_type={self.encoder_type!r}; valid: {ENCODER_TYPES}")
        if self.encoder_hidden_size is not None and self.encoder_hidden_size <= 0:
            raise ValueError(f"PTuning: encoder_hidden_size={self.encoder_hidden_size} must be > 0")
        if not 0.0 <= self.encoder_dropout < 1.0:
            raise ValueError(f"PTuning: encoder_dropout={self.encoder_dropout} not in [0, 1)")
        if self.encoder_type == "MLP" and self.encoder_num_layers != 2:
            warnings.warn(
                "PTuning: the MLP encoder always has 2 hidden layers; "
                f"encoder_num_layers={self.encoder_num_layers} is ignored",
                stacklevel=3,
            )

    def hidden_size(self, cfg: LlamaConfig) -> int:
        """The encoder width (peft's default: the model's hidden size)."""
        return self.encoder_hidden_size or cfg.hidden_size

    def init(self, key: jax.Array, params: Params, cfg: LlamaConfig) -> Params:
        k_embed, k_enc = jax.random.split(key)
        dim, hidden = cfg.hidden_size, self.hidden_size(cfg)
        embedding = jax.random.normal(k_embed, (self.num_virtual_tokens, dim), jnp.float32)
        if self.encoder_type == "LSTM":
            encoder = encoders.init_lstm(k_enc, dim, hidden, self.encoder_num_layers)
        else:
            encoder = encoders.init_mlp(k_enc, dim, hidden)
        prompt = PromptEncoder(embedding, encoder, self.encoder_type, self.encoder_dropout)
        return install(params, "prompt", prompt)

    def adapter_config(self, cfg: LlamaConfig) -> dict[str, Any]:
        return {
            "peft_type": self.peft_type,
            **peft_io.model_keys(cfg, self.num_virtual_tokens, prefix=False),
            "encoder_reparameterization_type": self.encoder_type,
            "encoder_hidden_size": self.hidden_size(cfg),
            "encoder_num_layers": self.encoder_num_layers,
            "encoder_dropout": self.encoder_dropout,
        }

    def adapter_tensors(self, params: Params, cfg: LlamaConfig) -> dict[str, np.ndarray]:
        return table_tensors(params, "prompt", (PromptEncoder, SoftPrompt), "PTuning")

    @classmethod
    def read_adapter(
        cls, config: AdapterConfig, tensors: AdapterTensors, params: Params, cfg: LlamaConfig
    ) -> tuple[PTuning, Params]:
        n, params = _read_soft_prompt(config, tensors, params, cfg)
        method = cls(
            num_virtual_tokens=n,
            encoder_type=config.get("encoder_reparameterization_type", str, "MLP"),
            encoder_hidden_size=config.get("encoder_hidden_size", int),
            encoder_num_layers=config.get("encoder_num_layers", int, 2),
            encoder_dropout=float(config.get("encoder_dropout", NUMBER, 0.0)),
        )
        return method, params


def _read_soft_prompt(
    config: AdapterConfig, tensors: AdapterTensors, params: Params, cfg: LlamaConfig
) -> tuple[int, Params]:
    """``(num_virtual_tokens, params with the saved table as a plain soft prompt)``."""
    n = peft_io.check_model(config, cfg, prefix=False)
    table = tensors.take(peft_io.TABLE, (n, cfg.hidden_size))
    return n, install(params, "prompt", SoftPrompt(jnp.asarray(table)))
