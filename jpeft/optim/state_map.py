"""Which parameter each leaf of an optimizer state belongs to.

Built on :func:`optax.tree_map_params`, which finds the copies of the parameter tree inside
any optax state (Adam's ``mu`` and ``nu``, those under ``optax.masked`` or
``optax.multi_transform``...) by initializing the optimizer with a placeholder. jpeft adds
two kinds of per-parameter entries that span several arrays or none: an 8-bit
:class:`jpeft.optim.QuantizedMoment` (codes and absmax) and optax's ``MaskedNode`` (a
parameter a masked transformation does not touch). Everything else in a state (step counts,
empty states) belongs to no parameter.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import optax

from jpeft.optim.adamw8bit import QuantizedMoment

Tree = Any
SHARED = -1  # the group of state leaves that belong to no parameter


def is_param_entry(x: Any) -> bool:
    """True for what stands in an optimizer state for one parameter as a whole.

    Example:
        >>> import optax
        >>> is_param_entry(optax.MaskedNode())
        True
    """
    return isinstance(x, QuantizedMoment | optax.MaskedNode)


def map_params(
    tx: optax.GradientTransformation,
    f: Callable[..., Any],
    state: optax.OptState,
    *param_trees: Tree,
    non_params: Callable[[Any], Any],
) -> Tree:
    """``f(entry, *param_leaves)`` for every per-parameter entry of ``state``.

    An entry is an array, a :class:`jpeft.optim.QuantizedMoment` or an ``optax.MaskedNode``;
    ``param_trees`` are trees shaped like the params (e.g. the params and their shardings).
    ``non_params(subtree)`` replaces the parts of the state that belong to no parameter.

    Raises:
        ValueError or TypeError: the state holds per-parameter entries of another structure.

    Example:
        >>> import jax.numpy as jnp, optax
        >>> params = {"w": jnp.zeros((2, 3))}
        >>> tx = optax.adam(1e-3)
        >>> shapes = map_params(tx, lambda leaf, p: p.shape, tx.init(params), params,
        ...                     non_params=lambda sub: None)
        >>> shapes[0].mu
        {'w': (2, 3)}
    """
    return optax.tree_map_params(
        tx, f, state, *param_trees, transform_non_params=non_params, is_leaf=is_param_entry
    )


def param_groups(tx: optax.GradientTransformation, state: optax.OptState, params: Tree) -> list:
    """For each leaf of ``state`` (in ``jax.tree.leaves`` order), the index of its parameter.

    The index is the parameter's position in ``jax.tree.leaves(params)``; leaves of no
    parameter get :data:`SHARED`. ``params`` may be the updates (same structure).

    Raises:
        ValueError or TypeError: as :func:`map_params`.

    Example:
        >>> import jax.numpy as jnp, optax
        >>> params = {"a": jnp.zeros(2), "b": jnp.zeros(3)}
        >>> tx = optax.adam(1e-3)
        >>> param_groups(tx, tx.init(params), params)  # count, mu a, mu b, nu a, nu b
        [-1, 0, 1, 0, 1]
    """
    leaves, treedef = jax.tree.flatten(params)
    indices = treedef.unflatten(range(len(leaves)))
    groups = map_params(
        tx,
        lambda entry, index: jax.tree.map(lambda _: index, entry),
        state,
        indices,
        non_params=lambda sub: jax.tree.map(lambda _: SHARED, sub),
    )
    return jax.tree.leaves(groups)
