"""Adapter arithmetic on a multi-adapter LoRA tree, as pure functions of params.

peft's ``LoraModel.add_weighted_adapter`` (combination types ``linear``, ``cat`` and
``svd``) and ``delete_adapter``. Each returns new params; nothing is mutated. The other
adapters keep their arrays bit for bit.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp

from jpeft.lora.multi import _as_class, adapter_names
from jpeft.lora.node import InactiveLoRAAdapter, LoRAAdapter, LoRAWeight, _scale
from jpeft.models.pytree import Params

COMBINATIONS = ("linear", "cat", "svd")


def _is_lora(x: Any) -> bool:
    return isinstance(x, LoRAWeight)


def _weights(params: Params) -> list[LoRAWeight]:
    return [x for x in jax.tree.leaves(params, is_leaf=_is_lora) if _is_lora(x)]


def add_weighted_adapter(
    params: Params,
    adapters: Sequence[str],
    weights: Sequence[float],
    adapter_name: str,
    combination_type: str = "svd",
    svd_rank: int | None = None,
) -> Params:
    """``params`` with a new adapter ``adapter_name``: a weighted combination of ``adapters``.

    As peft's ``add_weighted_adapter``: the new adapter has ``alpha = r`` (scaling 1),
    sits on every weight that holds any of ``adapters`` and is added inactive (frozen;
    :func:`jpeft.lora.set_adapter` makes it the active one). With ``w_k`` the weights,
    ``s_k`` the adapters' scalings and ``A_k [in, r_k]``, ``B_k [r_k, out]``:

    * ``linear``: ``A = sum_k sign(w_k s_k) sqrt|w_k s_k| A_k``,
      ``B = sum_k sqrt|w_k s_k| B_k`` (every adapter of the same rank ``r``; an
      approximation of the weighted sum of the deltas);
    * ``cat``: ``A = [w_1 s_1 A_1, ...]``, ``B = [B_1; ...]`` of rank ``sum_k r_k``
      (exactly ``sum_k w_k s_k A_k B_k``);
    * ``svd``: the rank-``svd_rank`` (default: the largest ``r_k``) truncated SVD of
      ``sum_k w_k s_k A_k B_k`` per layer (``B = U S``, ``A = V^T`` in peft's layout).

    A single adapter always combines ``linear`` (as peft). Arrays keep the first
    source's dtype; sums and the SVD run in float32.

    Raises:
        ValueError: an unknown or DoRA adapter, a taken name, weights not one per
            adapter, an unknown ``combination_type``, ``linear`` over unequal ranks.

    Example:
        >>> from jpeft.lora import LoRA, set_adapter
        >>> from jpeft.models import llama
        >>> from jpeft.models.config import LlamaConfig
        >>> cfg = LlamaConfig(vocab_size=8, hidden_size=8, intermediate_size=16,
        ...                   num_hidden_layers=1, num_attention_heads=2)
        >>> params = llama.init_params(jax.random.key(0), cfg)
        >>> for name in ("x", "y"):
        ...     params = LoRA(r=2, adapter_name=name).init(jax.random.key(1), params, cfg)
        >>> params = add_weighted_adapter(params, ["x", "y"], [1.0, 0.5], "xy", "cat")
        >>> set_adapter(params, "xy")["layers"]["self_attn"]["q_proj"]["kernel"].names
        ('x', 'y', 'xy')
    """
    adapters = tuple(adapters)
    known = adapter_names(params)
    _check(known, adapters, weights, adapter_name, combination_type)
    if len(adapters) == 1:
        combination_type = "linear"
    ranks = _ranks(params, adapters)
    if combination_type == "linear" and len(set(ranks.values())) > 1:
        raise ValueError(
            f"add_weighted_adapter: 'linear' needs adapters of one rank, found {ranks}; "
            "use 'cat' or 'svd'"
        )
    rank = {
        "linear": max(ranks.values()),
        "cat": sum(ranks.values()),
        "svd": svd_rank or max(ranks.values()),
    }[combination_type]
    index = len(known)
    weight_of = dict(zip(adapters, weights, strict=True))

    def combine(x: Any) -> Any:
        if not _is_lora(x):
            return x
        sources = [(ad, float(weight_of[ad.name])) for ad in x.adapters if ad.name in weight_of]
        if not sources:
            return x
        a, b = _COMBINE[combination_type](sources, rank)
        first = sources[0][0]
        masks = [ad.layer_mask for ad, _ in sources]
        mask = None
        if any(m is not None for m in masks):
            ones = jnp.ones_like(first.scaling)
            mask = jnp.max(jnp.stack([ones if m is None else m for m in masks]), 0)
        new = InactiveLoRAAdapter(
            a=_padded(a, rank, -1).astype(first.a.dtype),
            b=_padded(b, rank, -2).astype(first.b.dtype),
            scaling=jnp.ones_like(first.scaling),
            magnitude=None,
            name=adapter_name,
            index=index,
            dropout=first.dropout,
            layer_mask=mask,
        )
        return LoRAWeight(x.base, (*x.adapters, new))

    return jax.tree.map(combine, params, is_leaf=_is_lora)


def _check(
    known: tuple[str, ...],
    adapters: tuple[str, ...],
    weights: Sequence[float],
    adapter_name: str,
    combination_type: str,
) -> None:
    unknown = [n for n in adapters if n not in known]
    if unknown or not adapters:
        raise ValueError(
            f"add_weighted_adapter: unknown adapters {unknown or '[] (none given)'}; "
            f"params hold {list(known)}"
        )
    if adapter_name in known:
        raise ValueError(f"add_weighted_adapter: params already hold an adapter {adapter_name!r}")
    if len(weights) != len(adapters):
        raise ValueError(
            f"add_weighted_adapter: {len(weights)} weights for {len(adapters)} adapters"
        )
    if combination_type not in COMBINATIONS:
        raise ValueError(
            f"add_weighted_adapter: combination_type={combination_type!r}; "
            f"expected one of {list(COMBINATIONS)}"
        )


def _ranks(params: Params, adapters: tuple[str, ...]) -> dict[str, int]:
    """Each adapter's rank (its largest over the weights it sits on); refuses DoRA."""
    ranks = dict.fromkeys(adapters, 0)
    for weight in _weights(params):
        for ad in weight.adapters:
            if ad.name not in ranks:
                continue
            if ad.magnitude is not None:
                raise ValueError(
                    f"add_weighted_adapter: {ad.name!r} is a DoRA adapter; peft combines "
                    "plain LoRA adapters only"
                )
            ranks[ad.name] = max(ranks[ad.name], ad.a.shape[-1])
    return ranks


def _scaled(ad: LoRAAdapter, weight: float) -> jax.Array:
    """``weight * scaling`` per leading index (0 in layers without the adapter), fp32."""
    return weight * _scale(ad, jnp.float32)


def _linear(sources: list[tuple[LoRAAdapter, float]], rank: int) -> tuple[jax.Array, jax.Array]:
    a = b = 0.0
    for ad, weight in sources:
        ws = _scaled(ad, weight)[..., None, None]
        root = jnp.sqrt(jnp.abs(ws))
        a = a + jnp.where(ws >= 0, root, -root) * _padded(ad.a.astype(jnp.float32), rank, -1)
        b = b + root * _padded(ad.b.astype(jnp.float32), rank, -2)
    return a, b


def _cat(sources: list[tuple[LoRAAdapter, float]], rank: int) -> tuple[jax.Array, jax.Array]:
    a = [_scaled(ad, w)[..., None, None] * ad.a.astype(jnp.float32) for ad, w in sources]
    b = [ad.b.astype(jnp.float32) for ad, _ in sources]
    return jnp.concatenate(a, axis=-1), jnp.concatenate(b, axis=-2)


def _svd(sources: list[tuple[LoRAAdapter, float]], rank: int) -> tuple[jax.Array, jax.Array]:
    delta = sum(
        _scaled(ad, w)[..., None, None] * (ad.a.astype(jnp.float32) @ ad.b.astype(jnp.float32))
        for ad, w in sources
    )
    u, s, vh = jnp.linalg.svd(delta, full_matrices=False)  # delta = u s vh, [..., in, out]
    return u[..., :rank], s[..., :rank, None] * vh[..., :rank, :]


_COMBINE = {"linear": _linear, "cat": _cat, "svd": _svd}


def _padded(x: jax.Array, size: int, axis: int) -> jax.Array:
    """``x`` zero-padded (at the end) to ``size`` along ``axis``."""
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, size - x.shape[axis])
    return jnp.pad(x, widths)


def delete_adapter(params: Params, adapter_name: str) -> Params:
    """``params`` without adapter ``adapter_name`` (peft's ``delete_adapter``).

    The remaining adapters are renumbered in order (so ``adapter_ids`` keep meaning
    :func:`jpeft.lora.adapter_names`' positions); a weight left with no adapter
    becomes its base again. When no active adapter remains, the first remaining one
    becomes active (peft picks one per module, the first remaining there).

    Raises:
        ValueError: ``adapter_name`` is not in ``params`` (the message lists them).

    Example:
        >>> from jpeft.lora import LoRAAdapter, adapter_names
        >>> def lora(name, index):
        ...     a, b = jnp.ones((4, 2)), jnp.ones((2, 3))
        ...     return LoRAAdapter(a, b, jnp.float32(1), None, name, index, dropout=0.0)
        >>> w = LoRAWeight(jnp.eye(4, 3), (lora("x", 0), lora("y", 1)))
        >>> kept = delete_adapter({"q_proj": {"kernel": w}}, "x")
        >>> adapter_names(kept), kept["q_proj"]["kernel"].adapters[0].index
        (('y',), 0)
    """
    known = adapter_names(params)
    if adapter_name not in known:
        raise ValueError(f"delete_adapter: no adapter {adapter_name!r}; params hold {list(known)}")
    remaining = [n for n in known if n != adapter_name]
    active = {
        ad.name
        for w in _weights(params)
        for ad in w.adapters
        if ad.name != adapter_name and not isinstance(ad, InactiveLoRAAdapter)
    }
    if not active and remaining:
        active = {remaining[0]}

    def drop(x: Any) -> Any:
        if not _is_lora(x):
            return x
        kept = tuple(
            dataclasses.replace(
                _as_class(ad, LoRAAdapter if ad.name in active else InactiveLoRAAdapter),
                index=remaining.index(ad.name),
            )
            for ad in x.adapters
            if ad.name != adapter_name
        )
        return LoRAWeight(x.base, kept) if kept else x.base

    return jax.tree.map(drop, params, is_leaf=_is_lora)
