"""The PEFT methods the command line knows: name -> jpeft method, its options and defaults.

Adding a method is one :class:`MethodSpec` line in :data:`SPECS`. Its options are the
fields of the jpeft method dataclass, found by introspection: every field of a simple
type (int, float, str, bool, tuples of those, optional ones, string->number mappings)
becomes a ``--<method>-<field>`` flag and a key of the ``[<method>]`` config section.
A spec whose class is not importable yet (e.g. ``jpeft.QLoRA`` before it lands) stays
listed and fails with a clear error when selected.
"""

from __future__ import annotations

import dataclasses
import importlib
import types
import typing
from collections.abc import Mapping
from typing import Any

RE_PREFIX = "re:"


@dataclasses.dataclass(frozen=True)
class MethodSpec:
    """How the command line builds one method.

    Attributes:
        name: the ``--method`` value.
        target: ``"module:Class"`` of the jpeft method dataclass.
        lr: default peak learning rate (the best of a small sweep on the bundled task;
            soft prompts and gated prompts want far larger ones than LoRA).
        defaults: our defaults over the class's, tuned for the bundled tiny task.
        packing: False when packed rows are impossible (soft prompts are prepended
            once per row), so batches are padded instead.
        lists: string-or-tuple fields where a plain value is a comma-separated list
            (``--lora-targets q_proj,v_proj``); ``re:<regex>`` keeps a regex string.
        exclusive: pairs of options where giving one drops our default of the other.

    Example:
        >>> METHODS["lora"].lr > 0
        True
    """

    name: str
    target: str
    lr: float
    defaults: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    packing: bool = True
    lists: tuple[str, ...] = ()
    exclusive: tuple[tuple[str, str], ...] = ()

    def load(self) -> type:
        """The jpeft method class; ValueError naming the method if it is not available.

        Example:
            >>> METHODS["lora"].load().__name__
            'LoRA'
        """
        module, _, attr = self.target.partition(":")
        cls = getattr(importlib.import_module(module), attr, None)
        if cls is None:
            available = [s.name for s in METHODS.values() if s.available()]
            raise ValueError(
                f"--method {self.name}: {module}.{attr} is not available in this version of "
                f"jpeft; available methods: {', '.join(available)}"
            )
        return cls

    def available(self) -> bool:
        """Whether the method's class can be imported."""
        module, _, attr = self.target.partition(":")
        return hasattr(importlib.import_module(module), attr)


_LORA_DEFAULTS = {"r": 8, "alpha": 16.0, "targets": "all-linear"}
SPECS: tuple[MethodSpec, ...] = (
    MethodSpec("lora", "jpeft:LoRA", 3e-3, _LORA_DEFAULTS, lists=("targets",)),
    MethodSpec("qlora", "jpeft:QLoRA", 3e-3, _LORA_DEFAULTS, lists=("targets",)),
    MethodSpec(
        "adapter",
        "jpeft.adapters:Adapter",
        1e-2,
        {"bottleneck": 32},
        exclusive=(("bottleneck", "reduction_factor"),),
    ),
    MethodSpec("llama-adapter", "jpeft.adapters:LlamaAdapter", 1e-1, {"adapter_layers": 2}),
    MethodSpec("prefix", "jpeft:PrefixTuning", 1e-2, {"num_virtual_tokens": 10}),
    MethodSpec(
        "prompt",
        "jpeft:PromptTuning",
        1e-1,
        {"num_virtual_tokens": 10, "prompt_init": "SAMPLE_VOCAB"},
        packing=False,
    ),
    MethodSpec("ptuning", "jpeft:PTuning", 1e-2, {"num_virtual_tokens": 10}, packing=False),
    MethodSpec("ptuning-v2", "jpeft:PTuningV2", 1e-1, {"num_virtual_tokens": 10}),
)
METHODS: dict[str, MethodSpec] = {spec.name: spec for spec in SPECS}


def spec_for(name: str) -> MethodSpec:
    """The spec of ``--method name``; ValueError listing the known names.

    Example:
        >>> spec_for("prefix").target
        'jpeft:PrefixTuning'
    """
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; expected one of {', '.join(METHODS)}")
    return METHODS[name]


def option_types(name: str) -> dict[str, Any]:
    """``{option: type}`` of the options ``--method name`` takes (simple-typed fields only).

    Example:
        >>> option_types("llama-adapter")
        {'adapter_len': <class 'int'>, 'adapter_layers': <class 'int'>}
    """
    cls = spec_for(name).load()
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls) if _simple(hints[f.name])}


def option_defaults(name: str) -> dict[str, Any]:
    """Effective defaults of the options: the class's, overridden by the spec's.

    Example:
        >>> option_defaults("lora")["targets"]
        'all-linear'
    """
    spec = spec_for(name)
    cls = spec.load()
    out = {}
    for f in dataclasses.fields(cls):
        if f.default is not dataclasses.MISSING:
            out[f.name] = f.default
        elif f.default_factory is not dataclasses.MISSING:
            out[f.name] = f.default_factory()
    return {**out, **spec.defaults}


def build(name: str, options: Mapping[str, Any], tokenizer: Any = None) -> Any:
    """The jpeft method for ``--method name`` with the user's ``options`` over our defaults.

    A method with a ``tokenizer`` field (text-initialized prompts) gets ``tokenizer``.

    Example:
        >>> build("lora", {"r": 4}).r
        4
    """
    spec = spec_for(name)
    cls = spec.load()
    unknown = sorted(set(options) - set(option_types(name)))
    if unknown:
        raise ValueError(f"--method {name}: unknown options {unknown}")
    defaults = dict(spec.defaults)
    for a, b in spec.exclusive:
        for given, other in ((a, b), (b, a)):
            if given in options and other not in options:
                defaults.pop(other, None)
    kwargs = {**defaults, **options}
    if any(f.name == "tokenizer" for f in dataclasses.fields(cls)):
        kwargs["tokenizer"] = tokenizer
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as e:
        raise ValueError(f"--method {name}: {e}") from e


def _simple(tp: Any) -> bool:
    if tp in (int, float, str, bool):
        return True
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        return all(a is type(None) or _simple(a) for a in args)
    if origin is tuple:
        return len(args) == 2 and args[1] is Ellipsis and _simple(args[0])
    if origin in (Mapping, dict):
        return args[0] is str and args[1] in (int, float)
    return False
