"""jpeft: parameter-efficient fine-tuning of LLaMA-family models in JAX."""

from jpeft.hf_adapter import load_hf_adapter, save_hf_adapter
from jpeft.method import Method
from jpeft.nodes import Node, Trained, is_node, node
from jpeft.partition import combine, merge, nbytes, split

__all__ = [
    "Method",
    "Node",
    "Trained",
    "combine",
    "is_node",
    "load_hf_adapter",
    "merge",
    "nbytes",
    "node",
    "save_hf_adapter",
    "split",
]
