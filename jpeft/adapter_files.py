"""Adapter directories: one reader and validator of their two files for every method.

An adapter directory holds ``adapter_config.json`` (the method's options) and
``adapter_model.safetensors`` (its tensors), in HF peft's layout; methods peft lacks
(bottleneck adapters) use the same two files with their own keys. Every method reads
its options through :class:`AdapterConfig` and its tensors through
:class:`AdapterTensors`, so a wrong-typed or missing key, a missing or misshapen
tensor and a tensor the config does not account for are refused the same way, with
messages naming the file, the key or tensor, and what was expected against what was
found.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any

import numpy as np

from jpeft.models.param_spec import module_name
from jpeft.models.safetensors_io import read_weights

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."
"""What peft puts before a module's transformers name in its adapter files."""

_MISSING = object()
NUMBER = (int, float)
SEQUENCE = (list, tuple, set, frozenset)
"""A JSON list, or what a Python config dict holds instead (peft's ``to_dict`` gives sets)."""


def peft_module(layer: int, module: str) -> str:
    """peft's name of a module inside decoder layer ``layer`` (adapter tensor keys start so).

    Example:
        >>> peft_module(0, "v_proj")
        'base_model.model.model.layers.0.self_attn.v_proj'
    """
    return PEFT_PREFIX + module_name(layer, module)


def _type_names(types: tuple[type, ...]) -> str:
    return " or ".join("null" if t is type(None) else t.__name__ for t in types)


class AdapterConfig:
    """The values of an ``adapter_config.json``, read with type checks.

    Example:
        >>> config = AdapterConfig({"r": "eight"}, "adapter/adapter_config.json")
        >>> config.get("r", int, 8)
        Traceback (most recent call last):
        ValueError: adapter/adapter_config.json: 'r' is 'eight' (str); expected int
    """

    def __init__(self, values: Any, source: str = CONFIG_NAME) -> None:
        if not isinstance(values, Mapping):
            raise ValueError(f"{source}: expected a JSON object, found {type(values).__name__}")
        self.values, self.source = dict(values), source

    @classmethod
    def of(cls, config: AdapterConfig | Mapping[str, Any]) -> AdapterConfig:
        """``config`` itself, or a plain dict wrapped (its source named ``adapter_config.json``)."""
        return config if isinstance(config, AdapterConfig) else cls(config)

    def __contains__(self, key: str) -> bool:
        return self.values.get(key) is not None

    def get(
        self,
        key: str,
        types: type | tuple[type, ...] = object,
        default: Any = None,
        items: type | tuple[type, ...] | None = None,
    ) -> Any:
        """The value of ``key``, or ``default`` when it is absent or null.

        ``types`` are the accepted types (``bool`` is not an ``int`` here); ``items``
        the accepted types of a sequence's items or a dict's values.
        """
        value = self.values.get(key)
        if value is None:
            if default is _MISSING:
                raise ValueError(f"{self.source}: missing key {key!r}")
            return default
        types = types if isinstance(types, tuple) else (types,)
        if not _is(value, types):
            raise self.error(key, _type_names(types))
        if items is not None and isinstance(value, (dict, *SEQUENCE)):
            items = items if isinstance(items, tuple) else (items,)
            inner = value.values() if isinstance(value, dict) else value
            if not all(_is(item, items) for item in inner):
                raise self.error(key, f"a {type(value).__name__} of {_type_names(items)}")
        return value

    def require(self, key: str, types: type | tuple[type, ...] = object, **kw: Any) -> Any:
        """The value of ``key``; ``ValueError`` naming the file when it is absent or null."""
        return self.get(key, types, _MISSING, **kw)

    def error(self, key: str, expected: str) -> ValueError:
        """A ``ValueError`` naming the file, ``key``, its value and what was ``expected``."""
        value = self.values.get(key)
        found = f"{value!r} ({type(value).__name__})"
        return ValueError(f"{self.source}: {key!r} is {found}; expected {expected}")


def _is(value: Any, types: tuple[type, ...]) -> bool:
    if isinstance(value, bool) and int in types and bool not in types:
        return False  # JSON true is no rank or size
    return isinstance(value, types)


class AdapterTensors:
    """The tensors of an adapter file, taken one by one with their shapes checked.

    :meth:`take` refuses a missing or misshapen tensor; :meth:`check_all_used` then
    refuses tensors nothing took (the config does not account for them).

    Example:
        >>> tensors = AdapterTensors({"w": np.zeros((2, 3))}, "adapter_model.safetensors")
        >>> tensors.take("w", (3, 2))
        Traceback (most recent call last):
        ValueError: adapter_model.safetensors: tensor 'w' has shape [2, 3], expected [3, 2]
    """

    def __init__(self, tensors: Mapping[str, np.ndarray], source: str = WEIGHTS_NAME) -> None:
        self.tensors, self.source = dict(tensors), source
        self.used: set[str] = set()

    @classmethod
    def of(cls, tensors: AdapterTensors | Mapping[str, np.ndarray]) -> AdapterTensors:
        """``tensors`` itself, or a plain dict wrapped."""
        return tensors if isinstance(tensors, AdapterTensors) else cls(tensors)

    def take(self, name: str, shape: tuple[int, ...]) -> np.ndarray:
        """Tensor ``name`` as float32, checked to have ``shape``."""
        if name not in self.tensors:
            expected = f"expected shape {list(shape)}"
            raise ValueError(f"{self.source}: missing tensor {name!r} ({expected})")
        found = self.tensors[name]
        if tuple(found.shape) != tuple(shape):
            raise ValueError(
                f"{self.source}: tensor {name!r} has shape {list(found.shape)}, "
                f"expected {list(shape)}"
            )
        self.used.add(name)
        return np.asarray(found, np.float32)

    def check_all_used(self) -> None:
        """Raise ``ValueError`` for tensors no :meth:`take` asked for."""
        unused = sorted(set(self.tensors) - self.used)
        if unused:
            raise ValueError(
                f"{self.source}: {len(unused)} tensors are not used by its config, e.g. "
                f"{unused[:3]}"
            )


def read_adapter_dir(
    adapter_dir: str | os.PathLike, allow_nonfinite: bool = False
) -> tuple[AdapterConfig, AdapterTensors]:
    """The config and tensors of an adapter directory, every problem named with its file.

    Tensors are read by :func:`jpeft.models.safetensors_io.read_weights`: floating point
    and finite (NaN/Inf refused unless ``allow_nonfinite``).

    Raises:
        FileNotFoundError: no ``adapter_config.json`` or ``adapter_model.safetensors``.
        ValueError: the config is not valid JSON or not a JSON object; a corrupt
            safetensors file; a tensor that is not floating point, or not finite.

    Example:
        >>> import jax, tempfile, jpeft
        >>> from jpeft.models import hf
        >>> cfg, params = hf.load_pretrained("assets/tiny-llama")
        >>> method = jpeft.LoRA(r=2)
        >>> out = tempfile.mkdtemp()
        >>> jpeft.save_hf_adapter(out, method, method.init(jax.random.key(0), params, cfg), cfg)
        >>> config, tensors = read_adapter_dir(out)
        >>> config.require("peft_type", str), len(tensors.tensors) > 0
        ('LORA', True)
    """
    adapter_dir = os.fspath(adapter_dir)
    config_path = os.path.join(adapter_dir, CONFIG_NAME)
    weights_path = os.path.join(adapter_dir, WEIGHTS_NAME)
    for path in (config_path, weights_path):
        if not os.path.exists(path):
            raise FileNotFoundError(f"no {os.path.basename(path)} in {adapter_dir}")
    with open(config_path) as f:
        try:
            values = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{config_path}: not valid JSON ({e})") from e
    tensors = read_weights(weights_path, allow_nonfinite)
    return AdapterConfig(values, config_path), AdapterTensors(tensors, weights_path)
