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

"This layer has no adapter" is said one way by every method: a per-layer node keeps
the full leading layer axis and a frozen ``layer_mask [L]`` (:func:`layer_mask`: 1 where
the method adapts the layer, 0 elsewhere) that multiplies its contribution, so the
masked layers' slots get exactly zero gradient and never change; the layer scan runs
over all layers at once.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any, ClassVar, TypeVar

import jax
import jax.numpy as jnp
import numpy as np

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

    def bias_merged(self) -> tuple[Any, jax.Array | None]:
        """``(node, delta)``: for a kernel node, what merging adds to its layer's bias
        ``[..., out]`` (None: nothing) and the node with that part taken out.

        :func:`jpeft.merge` adds ``delta`` to the ``bias`` next to the kernel (peft's
        ``lora_bias``); the default adds nothing.
        """
        return self, None

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


def adapted_layers(layers: Sequence[int] | None, num_layers: int, owner: str) -> tuple[int, ...]:
    """The sorted layer indices a method adapts (all when ``layers`` is None), checked.

    Example:
        >>> adapted_layers(None, 3, "Adapter"), adapted_layers((2, 0), 3, "Adapter")
        ((0, 1, 2), (0, 2))
    """
    chosen = range(num_layers) if layers is None else layers
    bad = [i for i in chosen if not 0 <= i < num_layers]
    if bad:
        raise ValueError(f"{owner}: layers {bad} out of range for {num_layers} layers")
    return tuple(sorted(set(chosen)))


def layer_mask(layers: Sequence[int] | None, num_layers: int, owner: str) -> jax.Array:
    """float32 ``[num_layers]``: 1 in the layers a method adapts (all when None), 0 elsewhere.

    Example:
        >>> layer_mask((1,), 3, "Adapter").tolist()
        [0.0, 1.0, 0.0]
    """
    mask = np.zeros(num_layers, np.float32)
    mask[list(adapted_layers(layers, num_layers, owner))] = 1.0
    return jnp.asarray(mask)


def masked_layers(mask: jax.Array) -> tuple[int, ...]:
    """The layers a ``layer_mask`` keeps: where a method's adapter exists (what its file holds).

    Example:
        >>> masked_layers(jnp.array([0.0, 1.0, 1.0]))
        (1, 2)
    """
    return tuple(int(i) for i in np.flatnonzero(np.asarray(mask)))


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
