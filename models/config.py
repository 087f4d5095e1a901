"""LLaMA configuration read from (and written to) a Hugging Face ``config.json``."""

from __future__ import annotations

import dataclasses
import functools
import math
import numbers
import os
import types
import typing
from typing import Any

from jpeft.models.files import read_json

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


_POSITIVE = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "rms_norm_eps",
    "rope_theta",
    "max_position_embeddings",
)


def _check_fields(obj: Any) -> None:
    """Check each field of a config dataclass against its annotation (ints given for floats
    become floats); a mismatch raises ValueError naming the field, value and type."""
    for name, hint in _hints(type(obj)).items():
        value = getattr(obj, name)
        if not _matches(value, hint):
            raise ValueError(f"{name}={value!r} is {_a(value)}; expected {_describe(hint)}")
        if hint is float:
            object.__setattr__(obj, name, float(value))


def _check_positive(obj: Any, names: tuple[str, ...]) -> None:
    for name in names:
        value = getattr(obj, name)
        if value is not None and not (value > 0 and math.isfinite(value)):
            raise ValueError(f"{name}={value!r} must be a positive number")


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _matches(value: Any, hint: Any) -> bool:
    args = typing.get_args(hint)
    if typing.get_origin(hint) in (types.UnionType, typing.Union):
        return any(_matches(value, arg) for arg in args)
    if typing.get_origin(hint) is tuple:
        return isinstance(value, list | tuple) and all(_matches(v, args[0]) for v in value)
    if hint is type(None):
        return value is None
    if isinstance(value, bool) or hint is bool:
        return isinstance(value, bool) and hint is bool
    if hint is int:
        return isinstance(value, numbers.Integral)
    if hint is float:
        return isinstance(value, numbers.Real)
    return isinstance(value, hint)


def _describe(hint: Any) -> str:
    args = typing.get_args(hint)
    if typing.get_origin(hint) in (types.UnionType, typing.Union):
        return " or ".join(_describe(arg) for arg in args)
    if typing.get_origin(hint) is tuple:
        return f"a list of {_describe(args[0])}"
    return "null" if hint is type(None) else hint.__name__


def _a(value: Any) -> str:
    """``'a str'``, ``'a list'``, ``'null'``: a JSON value's type for an error message."""
    if value is None:
        return "null"
    name = type(value).__name__
    return f"{'an' if name[0] in 'aeiou' else 'a'} {name}"


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """RoPE frequency scaling: HF's ``rope_scaling`` (default, linear, dynamic, llama3).

    Raises:
        ValueError: a field of the wrong type or out of range, naming it.

    Example:
        >>> RopeScaling.from_hf({"rope_type": "linear", "factor": 2}).factor
        2.0
    """

    rope_type: str = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int | None = None

    def __post_init__(self) -> None:
        _check_fields(self)
        if self.rope_type not in _ROPE_TYPES:
            raise ValueError(
                f"rope_type={self.rope_type!r} is not supported; expected one of {_ROPE_TYPES}"
            )
        _check_positive(self, ("factor", "original_max_position_embeddings"))

    @classmethod
    def from_hf(cls, raw: dict[str, Any] | None) -> RopeScaling:
        """Build from HF's ``rope_scaling`` dict (or ``rope_parameters``); None is no scaling.

        Errors name the key as ``rope_scaling.<key>``.
        """
        if not raw:
            return cls()
        if not isinstance(raw, dict):
            raise ValueError(f"rope_scaling={raw!r} is {_a(raw)}; expected an object or null")
        known = {"rope_type", "type", "factor", "low_freq_factor", "high_freq_factor"}
        known |= {"original_max_position_embeddings", "rope_theta"}
        unknown = sorted(set(raw) - known)
        if unknown:
            raise ValueError(f"rope_scaling has unsupported keys {unknown}")
        fields = {k: raw[k] for k in raw if k in known - {"type", "rope_type", "rope_theta"}}
        try:
            return cls(rope_type=raw.get("rope_type", raw.get("type", "default")), **fields)
        except ValueError as e:
            raise ValueError(f"rope_scaling.{e}") from None

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
        _check_fields(self)
        _check_positive(self, _POSITIVE)
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
    def from_hf(cls, raw: dict[str, Any], source: str = "config.json") -> LlamaConfig:
        """Build from the dict of an HF ``config.json``.

        Raises:
            ValueError: ``raw`` is not a dict; an unsupported model type, activation,
                RoPE scaling or field; a missing required field; a value of the wrong
                type or out of range. The message starts with ``source`` and names the
                key, the value and what was expected.

        Example:
            >>> LlamaConfig.from_hf({"vocab_size": 8, "hidden_size": "128",
            ...                      "intermediate_size": 8, "num_hidden_layers": 1,
            ...                      "num_attention_heads": 1})
            Traceback (most recent call last):
            ...
            ValueError: config.json: hidden_size='128' is a str; expected int
        """
        try:
            return cls._from_hf(raw)
        except ValueError as e:
            raise ValueError(f"{source}: {e}") from None

    @classmethod
    def _from_hf(cls, raw: dict[str, Any]) -> LlamaConfig:
        if not isinstance(raw, dict):
            raise ValueError(f"expected a JSON object of settings, found {_a(raw)}")
        raw = dict(raw)
        if raw.get("model_type", "llama") != "llama":
            raise ValueError(f"model_type={raw['model_type']!r}, expected 'llama'")
        act = raw.pop("hidden_act", "silu")
        if act != "silu":
            raise ValueError(f"hidden_act={act!r} is not supported (only 'silu')")
        rope_params = raw.pop("rope_parameters", None)  # transformers >= 5 layout
        scaling = raw.pop("rope_scaling", None)
        if rope_params is not None and not isinstance(rope_params, dict):
            raise ValueError(
                f"rope_parameters={rope_params!r} is {_a(rope_params)}; expected an object"
            )
        if rope_params:
            raw.setdefault("rope_theta", rope_params.get("rope_theta", 10000.0))
            if rope_params.get("rope_type", "default") != "default":
                scaling = rope_params
        fields = {f.name for f in dataclasses.fields(cls)} - {"rope_scaling", "name_or_path"}
        unknown = sorted(k for k in raw if k not in fields and k not in _IGNORED_KEYS)
        if unknown:
            raise ValueError(f"unsupported fields {unknown}")
        kwargs = {k: v for k, v in raw.items() if k in fields}
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers"):
            if name not in kwargs:
                raise ValueError(f"required field {name!r} is missing")
        return cls(rope_scaling=RopeScaling.from_hf(scaling), **kwargs)

    @classmethod
    def from_json(cls, path: str | os.PathLike) -> LlamaConfig:
        """Read ``config.json`` (a file, or a model directory containing one); ``name_or_path``
        is the absolute directory.

        Raises:
            FileNotFoundError: no ``config.json`` there.
            ValueError: a symlink loop or unreadable file, invalid JSON (with line and
                column), or what :meth:`from_hf` refuses; each names the file.
        """
        path = os.fspath(path)
        if os.path.isdir(path):
            path = os.path.join(path, "config.json")
        if not os.path.lexists(path):
            raise FileNotFoundError(f"no config.json at {path}")
        cfg = cls.from_hf(read_json(path), source=path)
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
