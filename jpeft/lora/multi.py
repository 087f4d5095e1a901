"""Several named LoRA adapters in one params tree, and mixed-adapter batches.

Adapters are numbered in the order they were added (``LoRA(adapter_name=...).init``
or :func:`jpeft.lora.load_adapter` on params that already hold adapters). The newest one
is active; :func:`set_adapter` chooses others. A forward pass with
``ctx.adapter_ids [B]`` (``Llama.apply(..., adapter_ids=ids)``) gives each batch row
the adapter of that index (-1: the base alone) in one jitted call, like peft's
``model(input_ids, adapter_names=[...])``; build the ids with :func:`adapter_ids`.
Every adapter on a weight is evaluated for the whole batch and selected per row (a
gather of rows would need dynamic shapes), so the extra cost grows with the number
of adapters, each a rank-``r`` product.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp

from jpeft.lora.node import InactiveLoRAAdapter, LoRAAdapter, LoRAWeight
from jpeft.models.pytree import Params

BASE = "__base__"


def _is_lora(x: Any) -> bool:
    return isinstance(x, LoRAWeight)


def adapter_names(params: Params) -> tuple[str, ...]:
    """The names of the adapters in ``params``, by index.

    Example:
        >>> import jax, jpeft
        >>> from jpeft.models import hf, llama
        >>> cfg, base = hf.load_pretrained("assets/tiny-llama")
        >>> from jpeft.lora import LoRA
        >>> adapter_names(LoRA(adapter_name="a").init(jax.random.key(0), base, cfg))
        ('a',)
    """
    by_index: dict[int, str] = {}
    for weight in filter(_is_lora, jax.tree.leaves(params, is_leaf=_is_lora)):
        for ad in weight.adapters:
            if by_index.setdefault(ad.index, ad.name) != ad.name:
                raise ValueError(
                    f"LoRA: adapter index {ad.index} is both {by_index[ad.index]!r} and {ad.name!r}"
                )
    return tuple(by_index[i] for i in sorted(by_index))


def adapter_ids(params: Params, names: Sequence[str]) -> jax.Array:
    """Per-row adapter indices for ``ctx.adapter_ids`` from names (``"__base__"``: no adapter).

    Example:
        >>> import jax, jpeft
        >>> from jpeft.models import hf, llama
        >>> cfg, base = hf.load_pretrained("assets/tiny-llama")
        >>> from jpeft.lora import LoRA
        >>> params = LoRA(adapter_name="a").init(jax.random.key(0), base, cfg)
        >>> params = LoRA(adapter_name="b").init(jax.random.key(1), params, cfg)
        >>> ids = adapter_ids(params, ["a", "__base__", "b"])
        >>> ids.tolist()  # -1: the base model
        [0, -1, 1]
        >>> llama.Llama(cfg).apply({"params": params}, jnp.zeros((3, 4), jnp.int32),
        ...                        adapter_ids=ids).shape
        (3, 4, 1077)
    """
    known = adapter_names(params)
    unknown = sorted({n for n in names if n != BASE and n not in known})
    if unknown:
        raise ValueError(
            f"LoRA: unknown adapters {unknown}; params hold {list(known)} and {BASE!r}"
        )
    return jnp.array([-1 if n == BASE else known.index(n) for n in names], jnp.int32)


def set_adapter(params: Params, names: str | Sequence[str]) -> Params:
    """Make ``names`` the active adapters (applied by default, trainable); freeze the others.

    Example:
        >>> import jax, jpeft
        >>> from jpeft.models import hf, llama
        >>> cfg, base = hf.load_pretrained("assets/tiny-llama")
        >>> from jpeft.lora import LoRA
        >>> params = LoRA(adapter_name="a").init(jax.random.key(0), base, cfg)
        >>> params = LoRA(adapter_name="b").init(jax.random.key(1), params, cfg)
        >>> params = set_adapter(params, "a")
        >>> [type(a).__name__ for a in params["layers"]["self_attn"]["q_proj"]["kernel"].adapters]
        ['LoRAAdapter', 'InactiveLoRAAdapter']
    """
    names = (names,) if isinstance(names, str) else tuple(names)
    known = adapter_names(params)
    unknown = [n for n in names if n not in known]
    if unknown:
        raise ValueError(f"LoRA: unknown adapters {unknown}; params hold {list(known)}")

    def switch(x: Any) -> Any:
        if not _is_lora(x):
            return x
        adapters = tuple(
            _as_class(ad, LoRAAdapter if ad.name in names else InactiveLoRAAdapter)
            for ad in x.adapters
        )
        return LoRAWeight(x.base, adapters)

    return jax.tree.map(switch, params, is_leaf=_is_lora)


def add_adapter(kernel: Any, adapter: LoRAAdapter) -> LoRAWeight:
    """``kernel`` (a weight node, possibly a :class:`LoRAWeight`) with ``adapter`` added.

    Example:
        >>> a, b = jnp.zeros((2, 4, 2)), jnp.zeros((2, 2, 4))
        >>> adapter = LoRAAdapter(a=a, b=b, scaling=jnp.float32(1), magnitude=None,
        ...                       name="default", index=0, dropout=0.0)
        >>> add_adapter(jnp.zeros((2, 4, 4)), adapter).names
        ('default',)
    """
    if not isinstance(kernel, LoRAWeight):
        return LoRAWeight(kernel, (adapter,))
    site = (adapter.name, adapter.tied_lm_head)
    if any((ad.name, ad.tied_lm_head) == site for ad in kernel.adapters):
        raise ValueError(f"LoRA: params already hold an adapter named {adapter.name!r}")
    return LoRAWeight(kernel.base, (*kernel.adapters, adapter))


def _as_class(adapter: LoRAAdapter, cls: type[LoRAAdapter]) -> LoRAAdapter:
    if type(adapter) is cls:
        return adapter
    return cls(**{f.name: getattr(adapter, f.name) for f in dataclasses.fields(adapter)})
