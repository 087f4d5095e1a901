"""Optimizers: AdamW with 8-bit states and host-offloaded ("paged") optimizer state."""

from jpeft.optim.adamw8bit import (
    QuantizedMoment,
    ScaleByAdam8bitState,
    adamw_8bit,
    scale_by_adam_8bit,
)
from jpeft.optim.paged import host_offload_supported, paged, to_device, to_host

__all__ = [
    "QuantizedMoment",
    "ScaleByAdam8bitState",
    "adamw_8bit",
    "host_offload_supported",
    "paged",
    "scale_by_adam_8bit",
    "to_device",
    "to_host",
]
