"""jpeft: parameter-efficient fine-tuning of LLaMA-family models in JAX."""

from jpeft.nodes import Node, Trained, is_node, node
from jpeft.partition import combine, merge, nbytes, split

__all__ = ["Node", "Trained", "combine", "is_node", "merge", "nbytes", "node", "split"]
