"""Which projections and layers a LoRA adapter touches, with what rank and alpha.

Matching follows HF peft (``check_target_module_exists`` / ``get_pattern_key``) on
the module names of transformers' LLaMA, ``model.layers.{i}.{self_attn|mlp}.{name}``:

* ``targets="all-linear"``: every projection of every layer (``lm_head`` excluded).
* a tuple of names: a module is targeted when its full name *equals* one of them, or
  *ends with* ``"." + name`` and its layer is in ``layers_to_transform`` (peft skips
  the layer filter for exact full names, and so do we).
* any other string: a regular expression that must match a full name entirely.

``rank_pattern`` / ``alpha_pattern`` keys are regexes matched against the end of a
full name (``(.*\\.)?(key)$``); the first matching key wins, as in peft. Each
targeted module gets one rank per layer; layers with differing ranks are zero-padded
to the module's largest rank (see :mod:`jpeft.lora.node`).
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from jpeft.models.param_spec import PROJECTIONS, module_name

ALL_LINEAR = "all-linear"


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
    """The plan of every targeted projection, in ``PROJECTIONS`` order.

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
    for module in PROJECTIONS:
        ranks, alphas = [], []
        for i in range(num_layers):
            name = module_name(i, module)
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


def _targeted(
    targets: str | tuple[str, ...], layers: Sequence[int] | None, name: str, i: int
) -> bool:
    if targets == ALL_LINEAR:
        return layers is None or i in layers
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    if name in targets:
        return True
    return any(name.endswith(f".{t}") for t in targets) and (layers is None or i in layers)


def _check_targets(targets: str | tuple[str, ...], num_layers: int) -> None:
    names = [module_name(i, m) for i in range(num_layers) for m in PROJECTIONS]
    if targets == ALL_LINEAR:
        return
    if isinstance(targets, str):
        unmatched = [] if any(re.fullmatch(targets, n) for n in names) else [targets]
    else:
        unmatched = [t for t in targets if not any(n == t or n.endswith(f".{t}") for n in names)]
    if unmatched:
        raise ValueError(
            f"LoRA: target modules {unmatched} match no module of this model; valid names: "
            f"{list(PROJECTIONS)} (or {ALL_LINEAR!r}, or full names such as "
            f"{module_name(0, 'q_proj')!r})"
        )


def _check_patterns(
    rank_pattern: Mapping[str, int], alpha_pattern: Mapping[str, float], num_layers: int
) -> None:
    names = [module_name(i, m) for i in range(num_layers) for m in PROJECTIONS]
    for label, pattern in (("rank_pattern", rank_pattern), ("alpha_pattern", alpha_pattern)):
        unmatched = [k for k in pattern if not any(_key_matches(k, n) for n in names)]
        if unmatched:
            raise ValueError(
                f"LoRA: {label} keys {unmatched} match no module; valid names: {list(PROJECTIONS)}"
                f" (or suffixes of full names such as {module_name(0, 'q_proj')!r})"
            )


def _key_matches(key: str, name: str) -> bool:
    return re.match(rf"(.*\.)?({key})$", name) is not None


def _pattern_value(pattern: Mapping[str, Any], name: str, default: Any) -> Any:
    for key, value in pattern.items():
        if _key_matches(key, name):
            return value
    return default
