"""Pre-quantized ("packed") linear weights in HF checkpoints: a plug-in of the loader.

A checkpoint whose ``config.json`` has a ``quantization_config`` stores some linear
weights packed (e.g. bitsandbytes' ``Linear4bit``: a uint8 ``weight`` plus
``weight.absmax``, ``weight.quant_map``, ...). A :class:`PackedFormat` registered
for its ``quant_method`` tells :func:`jpeft.models.hf.load_pretrained` which tensors make
up one packed weight and turns them into a weight node, without requantizing;
:mod:`jpeft.plugins` registers ``"bitsandbytes"`` (4-bit NF4/FP4).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from typing import Any, Protocol

import numpy as np

from jpeft.models.files import read_json


class PackedFormat(Protocol):
    """How one ``quant_method`` stores a linear weight (see the module docstring)."""

    def is_packed(self, dtype: np.dtype) -> bool:
        """Whether a ``weight`` tensor of this dtype is packed (else it is a plain weight)."""

    def parts(self, key: str) -> tuple[str, ...]:
        """The other tensors that hold the packed weight ``key`` (all must be present)."""

    def unpack(self, key: str, tensors: Mapping[str, np.ndarray], shape: tuple[int, int]) -> Any:
        """The weight node of one layer from ``{key: ..., part: ...}``.

        ``shape`` is the HF weight shape ``[out, in]`` the config implies; raises
        ``ValueError`` naming ``key`` when the tensors do not describe it.
        """


PackedFormatFactory = Callable[[dict[str, Any]], PackedFormat]
"""``fn(quantization_config) -> PackedFormat``; raises ValueError for unsupported settings."""

PACKED_FORMATS: dict[str, PackedFormatFactory] = {}


def register_packed_format(quant_method: str, factory: PackedFormatFactory) -> None:
    """Let :func:`jpeft.models.hf.load_pretrained` read checkpoints of ``quant_method``.

    Example:
        >>> register_packed_format("bitsandbytes", PACKED_FORMATS["bitsandbytes"])  # jpeft's own
        >>> sorted(PACKED_FORMATS)
        ['bitsandbytes']
    """
    PACKED_FORMATS[quant_method] = factory


def packed_format(path: str) -> PackedFormat | None:
    """The format of a model directory's packed weights, or None for a plain checkpoint.

    Raises:
        ValueError: ``config.json`` has a ``quantization_config`` whose ``quant_method``
            has no registered format, or whose settings it does not support.
    """
    raw = read_json(os.path.join(path, "config.json"))
    config = raw.get("quantization_config") if isinstance(raw, dict) else None
    if config is None:
        return None
    method = config.get("quant_method") if isinstance(config, dict) else None
    if method not in PACKED_FORMATS:
        raise ValueError(
            f"{path}/config.json: quantization_config with quant_method={method!r} has no "
            f"registered reader (registered: {sorted(PACKED_FORMATS)})"
        )
    try:
        return PACKED_FORMATS[method](config)
    except ValueError as e:
        raise ValueError(f"{path}/config.json: {e}") from e
