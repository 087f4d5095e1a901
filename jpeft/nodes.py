"""PEFT nodes: pytree dataclasses that methods place inside the params tree.

A node says *which of its fields are trainable*; :func:`jpeft.split` reads that
and nothing else (no path-string matching). Declaring a node::

    @jpeft.nodes.node(trainable=("a", "b"), static=("scaling",))
    class LoRA(Node):
        base: Any
        a: jax.Array
        b: jax.Array
        scaling: float

Fields listed in ``static`` are pytree metadata (hashable Python values); all
other fields are children. A child that is itself a node is partitioned
recursively (e.g. LoRA over an NF4 base).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, ClassVar, TypeVar

import jax

from jpeft.models.linear import dense, matmul

T = TypeVar("T", bound=type)


class Node:
    """Base class of every PEFT node (see :func:`node`)."""

    trainable_fields: ClassVar[tuple[str, ...]] = ()
    data_fields: ClassVar[tuple[str, ...]] = ()

    def merged(self) -> Any:
        """What :func:`jpeft.merge` puts in this node's place (itself if it cannot fold)."""
        return self

    def logical_axes(self, base: tuple[str | None, ...] | None) -> Any:
        """This node with each array replaced by its logical axis names (a tuple).

        ``base`` is the logical axes of the tensor the node stands in for (e.g.
        ``("layers", "embed", "mlp")`` for a stacked kernel), or None for nodes that
        replace no tensor. The default replicates every array; nodes whose arrays
        are large or follow the base layout (LoRA, NF4) override it.
        """
        return jax.tree.map(lambda a: (None,) * a.ndim, self)


def node(trainable: tuple[str, ...] = (), static: tuple[str, ...] = ()) -> Callable[[T], T]:
    """Class decorator: a frozen dataclass registered as a pytree, with trainable fields.

    Example:
        >>> import jax.numpy as jnp
        >>> @node(trainable=("value",))
        ... class Scale(Node):
        ...     value: jax.Array
        >>> jax.tree.leaves(Scale(jnp.ones(2)))[0].shape
        (2,)
    """

    def wrap(cls: T) -> T:
        cls = dataclasses.dataclass(frozen=True)(cls)
        names = tuple(f.name for f in dataclasses.fields(cls))
        unknown = set(trainable) - set(names)
        if unknown:
            raise TypeError(f"{cls.__name__}: trainable fields {sorted(unknown)} are not fields")
        data = tuple(n for n in names if n not in static)
        cls.trainable_fields = tuple(trainable)
        cls.data_fields = data
        jax.tree_util.register_dataclass(cls, data_fields=list(data), meta_fields=list(static))
        return cls

    return wrap


def is_node(x: Any) -> bool:
    """True for PEFT nodes (use as ``is_leaf`` to map over whole nodes)."""
    return isinstance(x, Node)


@node(trainable=("value",))
class Trained(Node):
    """A base tensor trained in full (norms, embeddings or peft's ``modules_to_save``).

    Example:
        >>> import jax.numpy as jnp
        >>> dense(Trained(jnp.ones(3))).shape
        (3,)
    """

    value: jax.Array

    def merged(self) -> jax.Array:
        return self.value

    def logical_axes(self, base: tuple[str | None, ...] | None) -> Any:
        """A fully trained tensor shards exactly like the tensor it replaces."""
        if base is None or self.value is None or len(base) != self.value.ndim:
            return super().logical_axes(base)
        return Trained(tuple(base))


@dense.register(Trained)
def _dense_trained(w: Trained) -> jax.Array:
    return dense(w.value)


@matmul.register(Trained)
def _matmul_trained(w: Trained, x, ctx, name):
    return matmul(w.value, x, ctx, name)
