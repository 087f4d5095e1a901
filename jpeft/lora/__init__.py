"""LoRA (with rsLoRA and DoRA), multiple named adapters and mixed-adapter batches."""

from jpeft.lora.method import LoRA, load_adapter
from jpeft.lora.multi import adapter_ids, adapter_names, set_adapter
from jpeft.lora.node import InactiveLoRAAdapter, LoRAAdapter, LoRAWeight, unmerge

__all__ = [
    "InactiveLoRAAdapter",
    "LoRA",
    "LoRAAdapter",
    "LoRAWeight",
    "adapter_ids",
    "adapter_names",
    "load_adapter",
    "set_adapter",
    "unmerge",
]
