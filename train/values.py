"""Typed option values from command-line strings and config-file values, with clear errors."""

from __future__ import annotations

import json
import re
import types
import typing
from collections.abc import Mapping
from typing import Any

from jpeft.train.methods import RE_PREFIX

_UNIONS = (typing.Union, types.UnionType)
_TRUE = ("true", "yes", "on", "1")
_FALSE = ("false", "no", "off", "0")
_LIST_ITEMS = re.compile(r"[\w.,\s]+")


def coerce(value: Any, tp: Any, name: str, as_list: bool = False) -> Any:
    """``value`` (a CLI string or a TOML/YAML value) as type ``tp``; ValueError naming ``name``.

    ``"none"`` gives None for optional types; tuples take lists, comma-separated strings
    (``1,2``) and bracketed ones (``[1, 2]``, ``["q_proj"]``); mappings take JSON strings.
    With ``as_list`` a plain string for a ``str | tuple[str, ...]`` option is a
    comma-separated list, and ``re:<regex>`` is kept as one string.

    Example:
        >>> coerce("3", int, "steps"), coerce("none", float | None, "lr")
        (3, None)
        >>> coerce("q_proj,v_proj", str | tuple[str, ...], "targets", as_list=True)
        ('q_proj', 'v_proj')
        >>> coerce("[1, 2]", tuple[int, ...] | None, "layers"), coerce("3", tuple[int, ...], "x")
        ((1, 2), (3,))
    """
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in _UNIONS:
        return _union(value, args, name, as_list)
    if origin is tuple:
        items = _list_items(value) if isinstance(value, str) else value
        if isinstance(items, int | float) and not isinstance(items, bool):
            items = [items]  # a config file's ``layers: 1``
        if not isinstance(items, list | tuple):
            raise _error(name, tp, value)
        items = [i.strip() if isinstance(i, str) else i for i in items]
        return tuple(coerce(i, args[0], name) for i in items if i != "")
    if origin in (Mapping, dict):
        return _mapping(value, args, name, tp)
    return _scalar(value, tp, name)


def _union(value: Any, args: tuple, name: str, as_list: bool) -> Any:
    label = " or ".join("none" if a is type(None) else type_name(a) for a in args)
    if value is None or (isinstance(value, str) and value.strip().lower() in ("none", "null")):
        if type(None) in args:
            return None
        raise _error(name, label, value)
    options = [a for a in args if a is not type(None)]
    sequence = next((a for a in options if typing.get_origin(a) is tuple), None)
    if sequence is not None:
        if isinstance(value, list | tuple) or options == [sequence]:
            return coerce(value, sequence, name)
        if as_list and isinstance(value, str):
            if value.startswith(RE_PREFIX):
                return value[len(RE_PREFIX) :]
            if _LIST_ITEMS.fullmatch(value) or _is_bracketed(value):
                return coerce(value, sequence, name)
    for option in options:
        if option is sequence:
            continue
        try:
            return coerce(value, option, name)
        except ValueError:
            continue
    raise _error(name, label, value)


def _is_bracketed(text: str) -> bool:
    text = text.strip()
    return text.startswith("[") and text.endswith("]")


def _list_items(text: str) -> list[Any]:
    """The items of ``"a,b"``, ``"[1, 2]"`` or a JSON list string."""
    if not _is_bracketed(text):
        return text.split(",")
    try:
        items = json.loads(text)
    except json.JSONDecodeError:
        return text.strip()[1:-1].split(",")
    return items if isinstance(items, list) else [items]


def _mapping(value: Any, args: tuple, name: str, tp: Any) -> dict[str, Any]:
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as e:
            raise ValueError(f"{name}: expected a JSON object, found {value!r} ({e.msg})") from e
    if not isinstance(value, Mapping):
        raise _error(name, tp, value)
    return {str(k): coerce(v, args[1], f"{name}[{k!r}]") for k, v in value.items()}


def _scalar(value: Any, tp: Any, name: str) -> Any:
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in (*_TRUE, *_FALSE):
            return value.strip().lower() in _TRUE
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str) and re.fullmatch(r"\s*[-+]?\d+\s*", value):
            return int(value)
    elif tp is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
    elif tp is str:
        if isinstance(value, str):
            return value
    else:
        raise TypeError(f"{name}: unsupported option type {tp}")
    raise _error(name, tp, value)


def type_name(tp: Any) -> str:
    """A short name of an option type for help texts and errors.

    Example:
        >>> type_name(int | None), type_name(tuple[str, ...])
        ('int or none', 'list of str')
    """
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in _UNIONS:
        return " or ".join("none" if a is type(None) else type_name(a) for a in args)
    if origin is tuple:
        return f"list of {type_name(args[0])}"
    if args:
        return f"JSON object of {type_name(args[1])}"
    return getattr(tp, "__name__", str(tp))


def list_item_type(tp: Any) -> Any | None:
    """The item type of a list option (``tuple[int, ...]``, optionally in a union), else None.

    Example:
        >>> list_item_type(tuple[int, ...] | None), list_item_type(int)
        (<class 'int'>, None)
    """
    if typing.get_origin(tp) is tuple:
        return typing.get_args(tp)[0]
    if typing.get_origin(tp) in _UNIONS:
        return next(filter(None, map(list_item_type, typing.get_args(tp))), None)
    return None


def _error(name: str, tp: Any, value: Any) -> ValueError:
    expected = tp if isinstance(tp, str) else type_name(tp)
    return ValueError(f"{name}: expected {expected}, found {value!r}")
