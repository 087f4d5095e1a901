"""Optimizers: 8-bit AdamW, host-offloaded ("paged") state, decay masks and LoRA+."""

from jpeft.optim.adamw8bit import (
    QuantizedMoment,
    ScaleByAdam8bitState,
    adamw_8bit,
    scale_by_adam_8bit,
)
from jpeft.optim.groups import (
    adamw,
    decay_mask,
    lora_plus,
    lora_plus_labels,
    scale_schedule,
    with_clipping,
)
from jpeft.optim.paged import host_offload_supported, paged, to_device, to_host

__all__ = [
    "QuantizedMoment",
    "ScaleByAdam8bitState",
    "adamw",
    "adamw_8bit",
    "decay_mask",
    "host_offload_supported",
    "lora_plus",
    "lora_plus_labels",
    "paged",
    "scale_by_adam_8bit",
    "scale_schedule",
    "to_device",
    "to_host",
    "with_clipping",
]
