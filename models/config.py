"""LLaMA configuration read from (and written to) a Hugging Face ``config.json``."""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

_ROPE_TYPES = ("default", "linear", "dynamic", "llama3")

# HF keys that carry no meaning for the forward pass; accepted and ignored.
_IGNORED_KEYS = frozenset(
    {
        "architectures",
        "model_type",
        "torch_dtype",
        "dtype",
        "transformers_version",
        "initializer_range",
        "use_cache",
        "pretraining_tp",
        "attention_dropout",
        "_name_or_path",
        "output_attentions",
        "output_hidden_states",
        "return_dict",
        "tie_encoder_decoder",
        "is_encoder_decoder",
        "id2label",
        "label2id",
        "problem_type",
        "chunk_size_feed_forward",
        "add_cross_attention",
        "layer_types",
        "_attn_implementation_autoset",
        "quantization_config",
    }
)


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """RoPE frequency scaling: HF's ``rope_scaling`` (default, linear, dynamic, llama3)."""

    rope_type: str = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int | None = None

    @classmethod
    def from_hf(cls, raw: dict[str, Any] | None) -> RopeScaling:
        if not raw:
            return cls()
        rope_type = raw.get("rope_type", raw.get("type", "default"))
        if rope_type not in _ROPE_TYPES:
            raise ValueError(
                f"config.json: rope_scaling.rope_type={rope_type!r} is not supported; "
                f"expected one of {_ROPE_TYPES}"
            )
        known = {"rope_type", "type", "factor", "low_freq_factor", "high_freq_factor"}
        known |= {"original_max_position_embeddings", "rope_theta"}
        unknown = sorted(set(raw) - known)
        if unknown:
            raise ValueError(f"config.json: rope_scaling has unsupported keys {unknown}")
        orig = raw.get("original_max_position_embeddings")
        return cls(
            rope_type=rope_type,
            factor=float(raw.get("factor", 1.0)),
            low_freq_factor=float(raw.get("low_freq_factor", 1.0)),
            high_freq_factor=float(raw.get("high_freq_factor", 4.0)),
            original_max_position_embeddings=None if orig is None else int(orig),
        )

    def to_hf(self) -> dict[str, Any] | None:
        if self.rope_type == "default":
            return None
        out: dict[str, Any] = {"rope_type": self.rope_type, "factor": self.factor}
        if self.rope_type == "llama3":
            out["low_freq_factor"] = self.low_freq_factor
            out["high_freq_factor"] = self.high_freq_factor
        if self.original_max_position_embeddings is not None:
            out["original_max_position_embeddings"] = self.original_max_position_embeddings
        return out


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    """Architecture of a LLaMA 1/2/3-style decoder.

    Example:
        >>> cfg = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128,
        ...                   num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
        >>> cfg.head_dim, cfg.kv_groups
        (16, 2)
    """

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling = RopeScaling()
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    mlp_bias: bool = False
    bos_token_id: int | None = 1
    eos_token_id: int | tuple[int, ...] | None = 2
    pad_token_id: int | None = None
    # The directory it was read from (absolute; set by from_json). Not part of config.json
    # nor of equality; save_hf_adapter records it as the adapter's base_model_name_or_path.
    name_or_path: str | None = dataclasses.field(default=None, compare=False)

    def __post_init__(self) -> None:
        if self.num_key_value_heads is None:
            object.__setattr__(self, "num_key_value_heads", self.num_attention_heads)
        if self.head_dim is None:
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_attention_heads)
        if isinstance(self.eos_token_id, list):
            object.__setattr__(self, "eos_token_id", tuple(self.eos_token_id))
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads={self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads={self.num_key_value_heads}"
            )

    @property
    def kv_groups(self) -> int:
        """Query heads per key/value head (1 for MHA, num_attention_heads for MQA)."""
        return self.num_attention_heads // self.num_key_value_heads

    @property
    def eos_ids(self) -> tuple[int, ...]:
        """All end-of-sequence ids (LLaMA 3 configs list several)."""
        if self.eos_token_id is None:
            return ()
        if isinstance(self.eos_token_id, int):
            return (self.eos_token_id,)
        return tuple(self.eos_token_id)

    @classmethod
    def from_hf(cls, raw: dict[str, Any]) -> LlamaConfig:
        """Build from the dict of an HF ``config.json``; unsupported values raise ``ValueError``."""
        raw = dict(raw)
        if raw.get("model_type", "llama") != "llama":
            raise ValueError(f"config.json: model_type={raw['model_type']!r}, expected 'llama'")
        act = raw.pop("hidden_act", "silu")
        if act != "silu":
            raise ValueError(f"config.json: hidden_act={act!r} is not supported (only 'silu')")
        rope_params = raw.pop("rope_parameters", None)  # transformers >= 5 layout
        scaling = raw.pop("rope_scaling", None)
        if rope_params:
            raw.setdefault("rope_theta", rope_params.get("rope_theta", 10000.0))
            if rope_params.get("rope_type", "default") != "default":
                scaling = rope_params
        fields = {f.name for f in dataclasses.fields(cls)} - {"rope_scaling", "name_or_path"}
        unknown = sorted(k for k in raw if k not in fields and k not in _IGNORED_KEYS)
        if unknown:
            raise ValueError(f"config.json: unsupported fields {unknown}")
        kwargs = {k: v for k, v in raw.items() if k in fields}
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers"):
            if name not in kwargs:
                raise ValueError(f"config.json: required field {name!r} is missing")
        return cls(rope_scaling=RopeScaling.from_hf(scaling), **kwargs)

    @classmethod
    def from_json(cls, path: str | os.PathLike) -> LlamaConfig:
        """Read ``config.json`` (a file, or a model directory containing one); ``name_or_path``
        is the absolute directory."""
        path = os.fspath(path)
        if os.path.isdir(path):
            path = os.path.join(path, "config.json")
        if not os.path.exists(path):
            raise FileNotFoundError(f"no config.json at {path}")
        with open(path) as f:
            cfg = cls.from_hf(json.load(f))
        return dataclasses.replace(cfg, name_or_path=os.path.dirname(os.path.abspath(path)))

    def to_hf(self) -> dict[str, Any]:
        """The ``config.json`` dict transformers' ``LlamaConfig`` reads."""
        out = {
            f.name: getattr(self, f.name)
            for f in dataclasses.fields(self)
            if f.name not in ("rope_scaling", "eos_token_id", "name_or_path")
        }
        eos = self.eos_token_id
        out["eos_token_id"] = list(eos) if isinstance(eos, tuple) else eos
        out["rope_scaling"] = self.rope_scaling.to_hf()
        out.update(model_type="llama", architectures=["LlamaForCausalLM"], hidden_act="silu")
        return out
