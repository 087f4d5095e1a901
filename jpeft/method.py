"""The interface every PEFT method implements, and the registry peft files resolve through."""

from __future__ import annotations

import abc
from typing import Any, ClassVar

import jax
import numpy as np

from jpeft.models.config import LlamaConfig

Params = dict[str, Any]

_REGISTRY: dict[str, type[Method]] = {}


class Method(abc.ABC):
    """A PEFT method: a frozen dataclass of options plus a pure params transform.

    Subclasses set ``peft_type`` to HF peft's name (``"LORA"``, ``"PREFIX_TUNING"``...)
    or to a jpeft-only name, and are registered with :func:`register`.

    Example:
        >>> method = jpeft.LoRA(r=8, targets=("q_proj", "v_proj"))     # doctest: +SKIP
        >>> params = method.init(jax.random.key(0), params, cfg)       # doctest: +SKIP
    """

    peft_type: ClassVar[str]

    @abc.abstractmethod
    def init(self, key: jax.Array, params: Params, cfg: LlamaConfig) -> Params:
        """Return ``params`` with this method's nodes added (pure; ``params`` is untouched)."""

    @abc.abstractmethod
    def peft_config(self, cfg: LlamaConfig) -> dict[str, Any]:
        """The ``adapter_config.json`` dict peft reads for this method."""

    @abc.abstractmethod
    def peft_tensors(self, params: Params, cfg: LlamaConfig) -> dict[str, np.ndarray]:
        """The adapter tensors in peft's on-disk names and torch layout."""

    @classmethod
    @abc.abstractmethod
    def from_peft(
        cls,
        config: dict[str, Any],
        tensors: dict[str, np.ndarray],
        params: Params,
        cfg: LlamaConfig,
    ) -> tuple[Method, Params]:
        """Rebuild the method and its nodes over base ``params`` from a peft adapter."""


def register(cls: type[Method]) -> type[Method]:
    """Class decorator: make ``load_hf_adapter`` resolve ``cls.peft_type`` to ``cls``."""
    _REGISTRY[cls.peft_type] = cls
    return cls


def method_for(peft_type: str) -> type[Method]:
    """The registered method class for a peft ``peft_type``."""
    if peft_type not in _REGISTRY:
        raise ValueError(f"peft_type {peft_type!r} is not supported; known: {sorted(_REGISTRY)}")
    return _REGISTRY[peft_type]
