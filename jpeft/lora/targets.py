"""Which projections and layers a LoRA adapter touches, with what rank and alpha.

Matching follows HF peft (``check_target_module_exists`` / ``get_pattern_key``) on
the module names of transformers' LLaMA, ``model.layers.{i}.{self_attn|mlp}.{name}``,
``model.embed_tokens`` and ``lm_head``:

* ``targets="all-linear"``: every projection of every layer (``lm_head`` excluded).
* a tuple of names: a module is targeted when its full name *equals* one of them, or
  *ends with* ``"." + name`` and its layer is in ``layers_to_transform`` (peft skips
  the layer filter for exact full names, and so do we; ``embed_tokens`` and
  ``lm_head`` have no layer, so a layer filter leaves them out unless named in full).
* any other string: a regular expression that must match a full name entirely.

``rank_pattern`` / ``alpha_pattern`` keys are regexes matched against the end of a
full name (``re.match(rf"(.*\\.)?({key})$", name)``, peft's ``get_pattern_key``); the
first matching key wins, as in peft. Each targeted projection gets one rank per
layer; layers with differing ranks are zero-padded to the module's largest rank (see
:mod:`jpeft.lora.node`). ``embed_tokens`` and ``lm_head`` get one rank (``ranks`` of
length 1, ``per_layer`` False).

A key that matches no targeted module is dead. peft only warns about it (and saves
it), so :func:`live_patterns` drops such keys from a file peft wrote, with a warning;
:func:`resolve` refuses keys matching no module at all in a config written for jpeft.
"""

from __future__ import annotations

import dataclasses
import math
import re
import warnings
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np

from jpeft.models.param_spec import PROJECTIONS, TOP_MODULES, module_name, top_module

ALL_LINEAR = "all-linear"
MODULES = PROJECTIONS + TOP_MODULES
"""Every module LoRA can adapt, by its short name."""


@dataclasses.dataclass(frozen=True)
class ModulePlan:
    """Where one projection gets an adapter: a rank and an alpha per layer (rank 0: untouched).

    Example:
        >>> plan = ModulePlan("q_proj", ranks=(0, 4), alphas=(8.0, 8.0))
        >>> plan.layers, plan.scaling(use_rslora=False).tolist()
        ((1,), [0.0, 2.0])
    """

    module: str
    ranks: tuple[int, ...]
    alphas: tuple[float, ...]

    @property
    def per_layer(self) -> bool:
        """True for projections (stacked over layers), False for ``embed_tokens``/``lm_head``."""
        return self.module in PROJECTIONS

    @property
    def layers(self) -> tuple[int, ...]:
        """The layers this adapter transforms."""
        return tuple(i for i, r in enumerate(self.ranks) if r > 0)

    @property
    def max_rank(self) -> int:
        """The width of the stacked (zero-padded) ``a`` and ``b`` arrays."""
        return max(self.ranks)

    def scaling(self, use_rslora: bool) -> np.ndarray:
        """``alpha / r`` (``alpha / sqrt(r)`` with rsLoRA) per layer; 0 where untouched."""
        return np.array(
            [
                0.0 if r == 0 else a / (math.sqrt(r) if use_rslora else r)
                for r, a in zip(self.ranks, self.alphas, strict=True)
            ],
            np.float32,
        )


def resolve(
    targets: str | tuple[str, ...],
    layers_to_transform: tuple[int, ...] | None,
    r: int,
    alpha: float,
    rank_pattern: Mapping[str, int],
    alpha_pattern: Mapping[str, float],
    num_layers: int,
) -> dict[str, ModulePlan]:
    """The plan of every targeted module, in :data:`MODULES` order.

    Raises ``ValueError`` naming the valid modules when a target matches nothing.

    Example:
        >>> plans = resolve(("q_proj", "v_proj"), (1,), 8, 16, {"v_proj": 4}, {}, 2)
        >>> plans["v_proj"].ranks, plans["q_proj"].scaling(False).tolist()
        ((0, 4), [0.0, 2.0])
    """
    if layers_to_transform is not None:
        bad = [i for i in layers_to_transform if not 0 <= i < num_layers]
        if bad:
            raise ValueError(
                f"LoRA: layers_to_transform {bad} out of range for {num_layers} layers"
            )
    _check_patterns(rank_pattern, alpha_pattern, num_layers)
    _check_targets(targets, num_layers)
    plans = {}
    for module in MODULES:
        ranks, alphas = [], []
        for i, name in _sites(module, num_layers):
            hit = _targeted(targets, layers_to_transform, name, i)
            ranks.append(int(_pattern_value(rank_pattern, name, r)) if hit else 0)
            alphas.append(float(_pattern_value(alpha_pattern, name, alpha)))
        if any(ranks):
            plans[module] = ModulePlan(module, tuple(ranks), tuple(alphas))
    if not plans:
        raise ValueError(
            f"LoRA: targets {targets!r} with layers_to_transform={layers_to_transform} "
            "select no module"
        )
    return plans


def _sites(module: str, num_layers: int) -> Iterator[tuple[int | None, str]]:
    """``(layer, full name)`` of each instance of ``module`` (layer None outside the layers)."""
    if module in TOP_MODULES:
        yield None, top_module(module).hf_module
        return
    for i in range(num_layers):
        yield i, module_name(i, module)


def _names(num_layers: int) -> list[str]:
    return [name for module in MODULES for _, name in _sites(module, num_layers)]


def _targeted(
    targets: str | tuple[str, ...], layers: Sequence[int] | None, name: str, i: int | None
) -> bool:
    if targets == ALL_LINEAR:
        return i is not None and (layers is None or i in layers)
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    if name in targets:
        return True
    return any(name.endswith(f".{t}") for t in targets) and (layers is None or i in layers)


def _check_targets(targets: str | tuple[str, ...], num_layers: int) -> None:
    names = _names(num_layers)
    if targets == ALL_LINEAR:
        return
    if isinstance(targets, str):
        unmatched = [] if any(re.fullmatch(targets, n) for n in names) else [targets]
    else:
        unmatched = [t for t in targets if not any(n == t or n.endswith(f".{t}") for n in names)]
    if unmatched:
        raise ValueError(
            f"LoRA: target modules {unmatched} match no module of this model; valid names: "
            f"{list(MODULES)} (or {ALL_LINEAR!r}, or full names such as "
            f"{module_name(0, 'q_proj')!r})"
        )


def _check_patterns(
    rank_pattern: Mapping[str, int], alpha_pattern: Mapping[str, float], num_layers: int
) -> None:
    names = _names(num_layers)
    for label, pattern in (("rank_pattern", rank_pattern), ("alpha_pattern", alpha_pattern)):
        unmatched = [k for k in pattern if not any(_key_matches(k, n) for n in names)]
        if unmatched:
            raise ValueError(
                f"LoRA: {label} keys {unmatched} match no module; valid names: {list(MODULES)}"
                f" (or suffixes of full names such as {module_name(0, 'q_proj')!r})"
            )


def live_patterns(options: dict[str, Any], num_layers: int, source: str) -> dict[str, Any]:
    """``options`` (``jpeft.LoRA`` keyword arguments read from ``source``) without dead keys.

    A ``rank_pattern`` / ``alpha_pattern`` key that matches no *targeted* module does
    nothing; peft warns about it and drops nothing, so files it wrote carry such keys.
    They are dropped here with a ``UserWarning`` naming each (the adapter then gives
    peft's outputs, and a config saved again omits them).

    Example:
        >>> import warnings
        >>> with warnings.catch_warnings(record=True) as caught:
        ...     warnings.simplefilter("always")
        ...     kept = live_patterns({"targets": ("q_proj",), "layers_to_transform": None,
        ...                           "rank_pattern": {"^q_proj": 2, "q_proj": 4}}, 2, "f.json")
        >>> kept["rank_pattern"], str(caught[0].message)[:58]
        ({'q_proj': 4}, "f.json: rank_pattern keys ['^q_proj'] match no targeted mo")
    """
    targeted = [
        name
        for module in MODULES
        for i, name in _sites(module, num_layers)
        if _targeted(options["targets"], options["layers_to_transform"], name, i)
    ]
    kept = dict(options)
    for label in ("rank_pattern", "alpha_pattern"):
        pattern = options.get(label, {})
        dead = [k for k in pattern if not any(_key_matches(k, n) for n in targeted)]
        if dead:
            warnings.warn(
                f"{source}: {label} keys {dead} match no targeted module; ignored, as peft "
                "ignores them",
                stacklevel=3,
            )
            kept[label] = {k: v for k, v in pattern.items() if k not in dead}
    return kept


def _key_matches(key: str, name: str) -> bool:
    return re.match(rf"(.*\.)?({key})$", name) is not None


def _pattern_value(pattern: Mapping[str, Any], name: str, default: Any) -> Any:
    for key, value in pattern.items():
        if _key_matches(key, name):
            return value
    return default
