"""Logical axis names of every array in a params tree (sharding is data).

A base tensor's axes are those of its :class:`jpeft.models.param_spec.ParamSpec`
(e.g. ``layers/mlp/up_proj/kernel`` is ``("layers", "embed", "mlp")``). A PEFT node's
axes come from ``node.logical_axes(base_axes)``, where ``base_axes`` are the spec's axes
of the tensor the node stands in for (None for nodes that replace no tensor, e.g.
prompts). ``jpeft.train.sharding`` maps the names to mesh axes; the names are listed in
:mod:`jpeft.models.param_spec`. None means replicated.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax

from jpeft.models.param_spec import spec_at
from jpeft.models.pytree import Axes, Tree
from jpeft.nodes import Node, is_node


def is_axes(x: Any) -> bool:
    """True for a tuple of logical axis names (the leaves of :func:`logical_axes`).

    Example:
        >>> is_axes(("layers", None)), is_axes({"a": 1})
        (True, False)
    """
    return isinstance(x, tuple) and all(a is None or isinstance(a, str) for a in x)


def base_axes(keys: tuple[str, ...]) -> Axes | None:
    """Logical axes of the base tensor at dict path ``keys``, or None if not in the layout.

    Example:
        >>> base_axes(("layers", "mlp", "down_proj", "kernel"))
        ('layers', 'mlp', 'embed')
    """
    spec = spec_at(tuple(keys))
    return None if spec is None else spec.axes


def logical_axes(params: Tree) -> Tree:
    """``params`` with every array replaced by its tuple of logical axis names.

    Arrays outside the known layout, and node arrays whose ``logical_axes`` does not
    say otherwise, are replicated (all None). Works on the full params tree and on
    either part of :func:`jpeft.split` (fields that are None stay None).

    Example:
        >>> import jax.numpy as jnp
        >>> logical_axes({"embed_tokens": {"embedding": jnp.zeros((8, 4))}, "x": jnp.zeros(3)})
        {'embed_tokens': {'embedding': ('vocab', 'embed')}, 'x': (None,)}
    """
    return _axes(params, ())


def _axes(tree: Tree, keys: tuple[str, ...]) -> Tree:
    if is_node(tree):
        base = base_axes(keys) if keys else None
        return _like(tree.logical_axes(base), tree)
    if isinstance(tree, dict):
        return {k: _axes(v, (*keys, str(k))) for k, v in tree.items()}
    if tree is None:
        return None
    if hasattr(tree, "ndim"):
        axes = base_axes(keys) if keys else None
        if axes is None or len(axes) != tree.ndim:
            axes = (None,) * tree.ndim
        return axes
    return jax.tree.map(lambda a: (None,) * a.ndim, tree)


def _like(axes: Any, tree: Any) -> Any:
    """``axes`` with fields that are None in ``tree`` set to None (for split partitions)."""
    if tree is None:
        return None
    if is_node(tree) and isinstance(axes, Node):
        fields = {n: _like(getattr(axes, n), getattr(tree, n)) for n in type(tree).data_fields}
        return dataclasses.replace(axes, **fields)
    if is_axes(axes) and hasattr(tree, "ndim") and len(axes) != tree.ndim:
        raise ValueError(
            f"{type(tree).__name__}: logical_axes gave {axes} for an array of rank {tree.ndim}"
        )
    return axes
