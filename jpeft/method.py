"""The interface every PEFT method implements, and the registry adapter files resolve through."""

from __future__ import annotations

import abc
from collections.abc import Mapping
from typing import Any, ClassVar

import jax
import numpy as np

from jpeft.adapter_files import AdapterConfig, AdapterTensors
from jpeft.models.config import LlamaConfig
from jpeft.models.pytree import Params

_REGISTRY: dict[str, type[Method]] = {}


class Method(abc.ABC):
    """A PEFT method: a frozen dataclass of options plus a pure params transform.

    Subclasses set ``peft_type`` (the ``adapter_config.json`` key that names the
    method: HF peft's name such as ``"LORA"``, or a jpeft-only one starting with ``JPEFT_``,
    :data:`jpeft.model_card.OWN_TYPE_PREFIX`, which peft cannot load), are registered
    with :func:`register`, and implement :meth:`init` and the three adapter-file
    methods. :func:`jpeft.save_hf_adapter` writes :meth:`adapter_config` and
    :meth:`adapter_tensors`; :func:`jpeft.load_hf_adapter` calls :meth:`from_adapter`.

    Example:
        >>> from jpeft.models import hf, llama
        >>> cfg, base = hf.load_pretrained("assets/tiny-llama")
        >>> import jpeft
        >>> method = jpeft.LoRA(r=8, targets=("q_proj", "v_proj"))
        >>> params = method.init(jax.random.key(0), base, cfg)
        >>> method.peft_type, method.adapter_config(cfg)["r"]
        ('LORA', 8)
    """

    peft_type: ClassVar[str]

    @abc.abstractmethod
    def init(self, key: jax.Array, params: Params, cfg: LlamaConfig) -> Params:
        """Return ``params`` with this method's nodes added (pure; ``params`` is untouched)."""

    @abc.abstractmethod
    def adapter_config(self, cfg: LlamaConfig) -> dict[str, Any]:
        """The ``adapter_config.json`` dict of this method (with its ``peft_type``)."""

    @abc.abstractmethod
    def adapter_tensors(self, params: Params, cfg: LlamaConfig) -> dict[str, np.ndarray]:
        """The adapter tensors under their file names, in the file's (torch) layout."""

    @classmethod
    @abc.abstractmethod
    def read_adapter(
        cls, config: AdapterConfig, tensors: AdapterTensors, params: Params, cfg: LlamaConfig
    ) -> tuple[Method, Params]:
        """Rebuild the method and its nodes over base ``params``, taking every tensor it uses."""

    @classmethod
    def from_adapter(
        cls,
        config: AdapterConfig | Mapping[str, Any],
        tensors: AdapterTensors | Mapping[str, np.ndarray],
        params: Params,
        cfg: LlamaConfig,
        **options: Any,
    ) -> tuple[Method, Params]:
        """:meth:`read_adapter`, then refuse any tensor it did not use.

        ``config`` and ``tensors`` may be plain dicts; ``options`` go to ``read_adapter``.
        """
        tensors = AdapterTensors.of(tensors)
        method, params = cls.read_adapter(AdapterConfig.of(config), tensors, params, cfg, **options)
        tensors.check_all_used()
        return method, params


def register(cls: type[Method]) -> type[Method]:
    """Class decorator: make ``load_hf_adapter`` resolve ``cls.peft_type`` to ``cls``."""
    _REGISTRY[cls.peft_type] = cls
    return cls


def method_for(peft_type: str) -> type[Method]:
    """The registered method class for a ``peft_type``."""
    if peft_type not in _REGISTRY:
        raise ValueError(f"peft_type {peft_type!r} is not supported; known: {sorted(_REGISTRY)}")
    return _REGISTRY[peft_type]
