"""PEFT nodes: pytree dataclasses that methods place inside the params tree.

Everything a node type does is declared on the node type:

* which fields train (``trainable``; :func:`jpeft.split` reads that and nothing
  else, no path-string matching), which of them take weight decay (``decay``;
  default: all trainable fields) and which LoRA+ trains faster (``lora_plus``);
* how it multiplies and the tensor it stands for (``matmul``, ``dense``), how it
  folds into the base weights (``merged``), its sharding (``logical_axes``) and the
  forward hooks of :class:`jpeft.models.hooks.ParamNode` it answers.

Declaring a node::

    @jpeft.nodes.node(trainable=("a", "b"), static=("scaling",), lora_plus=("b",))
    class LoRA(Node):
        base: Any
        a: jax.Array
        b: jax.Array
        scaling: float

        def matmul(self, x, ctx, name): ...

Fields listed in ``static`` are pytree metadata (hashable Python values); all
other fields are children. A child that is itself a node is partitioned
recursively (e.g. LoRA over an NF4 base).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, ClassVar, TypeVar

import jax

from jpeft.models.context import Context
from jpeft.models.hooks import ParamNode
from jpeft.models.linear import dense, matmul
from jpeft.models.pytree import Axes

T = TypeVar("T", bound=type)

DECAYED_ROLES = ("kernel",)
"""Dict keys under which a base tensor takes weight decay (not norm scales, biases, embeddings)."""


class Node(ParamNode):
    """Base class of every PEFT node (see :func:`node`)."""

    trainable_fields: ClassVar[tuple[str, ...]] = ()
    data_fields: ClassVar[tuple[str, ...]] = ()
    decay_fields: ClassVar[tuple[str, ...] | None] = None
    lora_plus_fields: ClassVar[tuple[str, ...]] = ()

    def decayed_fields(self, role: str | None) -> tuple[str, ...]:
        """Fields that take weight decay (``decay``, default all trainable fields).

        ``role`` is the dict key the node sits under (``kernel``, ``scale``...).
        """
        return self.trainable_fields if self.decay_fields is None else self.decay_fields

    def merged(self) -> Any:
        """What :func:`jpeft.merge` puts in this node's place (itself if it cannot fold)."""
        return self

    def logical_axes(self, base: Axes | None) -> Any:
        """This node with each array replaced by its logical axis names (a tuple).

        ``base`` is the logical axes of the tensor the node stands in for (e.g.
        ``("layers", "embed", "mlp")`` for a stacked kernel), or None for nodes that
        replace no tensor. The default replicates every array; nodes whose arrays
        are large or follow the base layout (LoRA, NF4) override it.
        """
        return jax.tree.map(lambda a: (None,) * a.ndim, self)


def node(
    trainable: tuple[str, ...] = (),
    static: tuple[str, ...] = (),
    decay: tuple[str, ...] | None = None,
    lora_plus: tuple[str, ...] = (),
) -> Callable[[T], T]:
    """Class decorator: a frozen dataclass registered as a pytree, with its field roles.

    ``decay`` (default: every trainable field) and ``lora_plus`` name trainable fields.

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
        for role, fields in (("trainable", trainable), ("static", static)):
            unknown = set(fields) - set(names)
            if unknown:
                raise TypeError(f"{cls.__name__}: {role} fields {sorted(unknown)} are not fields")
        for role, fields in (("decay", decay or ()), ("lora_plus", lora_plus)):
            unknown = set(fields) - set(trainable)
            if unknown:
                raise TypeError(f"{cls.__name__}: {role} fields {sorted(unknown)} do not train")
        data = tuple(n for n in names if n not in static)
        cls.trainable_fields, cls.data_fields = tuple(trainable), data
        cls.decay_fields, cls.lora_plus_fields = decay, tuple(lora_plus)
        jax.tree_util.register_dataclass(cls, data_fields=list(data), meta_fields=list(static))
        return cls

    return wrap


def is_node(x: Any) -> bool:
    """True for PEFT nodes (use as ``is_leaf`` to map over whole nodes)."""
    return isinstance(x, Node)


@node(trainable=("value",))
class Trained(Node):
    """A base tensor trained in full (norms, embeddings or peft's ``modules_to_save``).

    It decays only as a kernel (:data:`DECAYED_ROLES`), and shards like the tensor it
    replaces.

    Example:
        >>> import jax.numpy as jnp
        >>> dense(Trained(jnp.ones(3))).shape
        (3,)
    """

    value: jax.Array

    def decayed_fields(self, role: str | None) -> tuple[str, ...]:
        return ("value",) if role in DECAYED_ROLES else ()

    def merged(self) -> jax.Array:
        return self.value

    def dense(self) -> jax.Array:
        return dense(self.value)

    def matmul(self, x: jax.Array, ctx: Context, name: str) -> jax.Array:
        return matmul(self.value, x, ctx, name)

    def logical_axes(self, base: Axes | None) -> Any:
        if base is None or self.value is None or len(base) != self.value.ndim:
            return super().logical_axes(base)
        return Trained(tuple(base))
