"""Split a params tree into its trainable and frozen parts, and put them back.

Gradients are taken w.r.t. the trainable part only, so frozen weights get no
gradient buffers and no optimizer state.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from jpeft.models.pytree import Tree
from jpeft.nodes import Node, is_node


def split(params: Tree) -> tuple[Tree, Tree]:
    """``(trainable, frozen)``: node fields marked trainable go left, everything else right.

    The trainable tree keeps only branches that hold trainable leaves; in the
    frozen tree the trainable fields are ``None``. ``combine`` inverts it exactly.

    Example:
        >>> import jax.numpy as jnp
        >>> from jpeft.nodes import Trained
        >>> params = {"w": jnp.ones(2), "norm": Trained(jnp.ones(3))}
        >>> trainable, frozen = split(params)
        >>> list(trainable), frozen["norm"].value is None
        (['norm'], True)
    """
    return _trainable_part(params), _frozen_part(params)


def _trainable_part(tree: Tree) -> Tree:
    if is_node(tree):
        fields = {}
        for name in type(tree).data_fields:
            value = getattr(tree, name)
            fields[name] = value if name in tree.trainable_fields else _trainable_part(value)
        if all(v is None for v in fields.values()):
            return None
        return dataclasses.replace(tree, **fields)
    if isinstance(tree, dict):
        kept = {k: _trainable_part(v) for k, v in tree.items()}
        kept = {k: v for k, v in kept.items() if v is not None}
        return kept or None
    if isinstance(tree, list | tuple):
        parts = [_trainable_part(v) for v in tree]
        return None if all(p is None for p in parts) else type(tree)(parts)
    return None


def _frozen_part(tree: Tree) -> Tree:
    if is_node(tree):
        fields = {
            name: None if name in tree.trainable_fields else _frozen_part(getattr(tree, name))
            for name in type(tree).data_fields
        }
        return dataclasses.replace(tree, **fields)
    if isinstance(tree, dict):
        return {k: _frozen_part(v) for k, v in tree.items()}
    if isinstance(tree, list | tuple):
        return type(tree)(_frozen_part(v) for v in tree)
    return tree


def combine(trainable: Tree, frozen: Tree) -> Tree:
    """The full params tree from the two parts of :func:`split`.

    Example:
        >>> import jax.numpy as jnp
        >>> from jpeft.nodes import Trained
        >>> params = {"w": jnp.ones(2), "norm": Trained(jnp.ones(3))}
        >>> combine(*split(params))["norm"].value.shape
        (3,)
    """
    if trainable is None:
        return frozen
    if frozen is None:
        return trainable
    if is_node(frozen):
        if type(trainable) is not type(frozen):
            raise ValueError(
                f"combine: trainable part is {type(trainable).__name__}, "
                f"frozen part is {type(frozen).__name__}"
            )
        fields = {
            name: combine(getattr(trainable, name), getattr(frozen, name))
            for name in type(frozen).data_fields
        }
        return dataclasses.replace(frozen, **fields)
    if isinstance(frozen, dict):
        if not isinstance(trainable, dict):
            raise ValueError(f"combine: expected a dict, got {type(trainable).__name__}")
        extra = set(trainable) - set(frozen)
        if extra:
            raise ValueError(f"combine: trainable keys {sorted(extra)} have no frozen counterpart")
        return {k: combine(trainable.get(k), v) for k, v in frozen.items()}
    if isinstance(frozen, list | tuple):
        return type(frozen)(combine(a, b) for a, b in zip(trainable, frozen, strict=True))
    raise ValueError(f"combine: both parts hold a leaf here ({type(frozen).__name__})")


def merge(params: Tree) -> Tree:
    """Fold every foldable node (LoRA deltas, fully trained tensors) into a plain tensor.

    Nodes that cannot fold (soft prompts, adapters, NF4 weights) stay as they are.

    Example:
        >>> import jax.numpy as jnp
        >>> from jpeft.nodes import Trained
        >>> merge({"norm": Trained(jnp.ones(3))})["norm"].shape
        (3,)
    """
    folded = _fold_biases(params, ())
    return jax.tree.map(lambda x: x.merged() if is_node(x) else x, folded, is_leaf=is_node)


def _fold_biases(tree: Tree, path: tuple[str, ...]) -> Tree:
    """``tree`` with each kernel node's bias part (:meth:`Node.bias_merged`) added to its bias."""
    if not isinstance(tree, dict):
        return tree
    tree = {k: _fold_biases(v, (*path, k)) for k, v in tree.items()}
    if not is_node(tree.get("kernel")):
        return tree
    kernel, delta = tree["kernel"].bias_merged()
    if delta is None:
        return tree
    if "bias" not in tree:
        name = "/".join(path)
        raise ValueError(
            f"merge: {name} has an adapter bias (peft's lora_bias=True) but the layer has no "
            "bias to fold it into (peft refuses this merge too); keep the adapter unmerged"
        )
    bias = jnp.asarray(tree["bias"])
    return {**tree, "kernel": kernel, "bias": (bias.astype(jnp.float32) + delta).astype(bias.dtype)}


def nbytes(tree: Tree) -> int:
    """Total bytes of the arrays in ``tree`` (e.g. of one partition).

    Example:
        >>> import jax.numpy as jnp
        >>> nbytes({"a": jnp.zeros((4,), jnp.float32), "b": None})
        16
    """
    return sum(int(leaf.size) * leaf.dtype.itemsize for leaf in jax.tree.leaves(tree))


__all__ = ["Node", "combine", "merge", "nbytes", "split"]
