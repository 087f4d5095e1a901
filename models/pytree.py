"""The type names of jpeft's pytrees, defined once for every package.

``Params`` is a params tree (nested dicts whose leaves are arrays or PEFT nodes),
``Tree`` any pytree (a partition of params, an optimizer state, a label tree) and
``Axes`` the logical axis names of one array (one name or None per dimension).

Example:
    >>> from jpeft.models.pytree import Axes, Params
    >>> axes: Axes = ("layers", "embed", None)
"""

from __future__ import annotations

import functools
import operator
from collections.abc import Sequence
from typing import Any

Params = dict[str, Any]
Tree = Any
Axes = tuple[str | None, ...]


def get_path(tree: Params, path: Sequence[str]) -> Any:
    """``tree[path[0]][path[1]]...``.

    Example:
        >>> get_path({"norm": {"scale": 1.0}}, ("norm", "scale"))
        1.0
    """
    return functools.reduce(operator.getitem, path, tree)


def put_path(tree: Params, path: Sequence[str], value: Any) -> None:
    """Set ``tree[path[0]]...[path[-1]] = value`` in place, creating dicts on the way.

    Example:
        >>> tree = {}
        >>> put_path(tree, ("norm", "scale"), 1.0)
        >>> tree
        {'norm': {'scale': 1.0}}
    """
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value


def replace_paths(tree: Params, values: dict[tuple[str, ...], Any]) -> Params:
    """A copy of ``tree`` with ``values`` put at their paths (only the dicts on the way copied).

    Example:
        >>> tree = {"a": {"b": 1, "c": 2}}
        >>> replace_paths(tree, {("a", "b"): 3}), tree
        ({'a': {'b': 3, 'c': 2}}, {'a': {'b': 1, 'c': 2}})
    """
    out = dict(tree)
    for path, value in values.items():
        node = out
        for key in path[:-1]:
            node[key] = dict(node.get(key, {}))
            node = node[key]
        node[path[-1]] = value
    return out


__all__ = ["Axes", "Params", "Tree", "get_path", "put_path", "replace_paths"]
