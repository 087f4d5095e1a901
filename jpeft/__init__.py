"""jpeft: parameter-efficient fine-tuning of LLaMA-family models in JAX."""

from importlib.metadata import version as _version

from jpeft import assets
from jpeft.adapters import Adapter, LlamaAdapter
from jpeft.arithmetic import add_weighted_adapter, delete_adapter
from jpeft.hf_adapter import load_hf_adapter, save_hf_adapter
from jpeft.lora import LoRA, unmerge
from jpeft.method import Method
from jpeft.models.selection import check_adapter_ids, unload
from jpeft.nodes import Node, Trained, is_node, node
from jpeft.partition import combine, merge, nbytes, split
from jpeft.plugins import register_builtins
from jpeft.prompts import MultitaskPromptTuning, PrefixTuning, PromptTuning, PTuning, PTuningV2
from jpeft.qlora import QLoRA

register_builtins()

__version__ = _version("jpeft")

__all__ = [
    "Adapter",
    "LlamaAdapter",
    "LoRA",
    "Method",
    "MultitaskPromptTuning",
    "Node",
    "PTuning",
    "PTuningV2",
    "PrefixTuning",
    "PromptTuning",
    "QLoRA",
    "Trained",
    "add_weighted_adapter",
    "assets",
    "check_adapter_ids",
    "combine",
    "delete_adapter",
    "is_node",
    "load_hf_adapter",
    "merge",
    "nbytes",
    "node",
    "save_hf_adapter",
    "split",
    "unload",
    "unmerge",
]
