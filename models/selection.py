"""Which adapters one forward call uses: checked per-row adapter ids, and the base alone.

peft switches adapters by mutating the model (``with model.disable_adapter():``,
``model.unload()``) and ignores row ids no adapter answers. Here params are never
changed: :func:`unload` returns the base params of an adapted tree (a new tree sharing
the base arrays), ``Llama.apply(..., disable_adapters=True)`` runs one call on them, and
:func:`check_adapter_ids` refuses ids outside ``-1 .. n_adapters - 1``.

Under ``jax.jit`` the ids are traced, so the forward pass cannot look at them: a row
whose id names no adapter then runs the base model alone (as ``-1`` does). The checked
variant wraps a jitted function calling :func:`check_adapter_ids` in
``jax.experimental.checkify.checkify`` (see :func:`check_adapter_ids`).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import checkify

from jpeft.models.context import Context
from jpeft.models.hooks import ParamNode
from jpeft.models.param_spec import BASE_ENTRIES, LAYER_ENTRIES
from jpeft.models.pytree import Params


def _is_node(x: Any) -> bool:
    return isinstance(x, ParamNode)


def unload(params: Params) -> Params:
    """The base model's params: every PEFT entry dropped, every adapted weight its base.

    peft's ``unload()`` (without merging). Top-level entries other than the base
    layout's (prompts, prefixes, LLaMA-Adapter) and ``layers`` entries other than the
    base layer's (bottleneck adapters) are dropped; a node at a base leaf's place is
    replaced by :meth:`jpeft.models.hooks.ParamNode.unloaded` (a LoRA weight by its
    base, which may be an NF4 weight; a fully trained tensor cannot be unloaded and
    raises ``TypeError``). Pure: ``params`` is not changed.

    Example:
        >>> class Scaled(ParamNode):
        ...     def __init__(self, w): self.w = w
        ...     def unloaded(self): return self.w
        >>> base = {"layers": {"mlp": {"up_proj": {"kernel": Scaled(jnp.ones(2))}}},
        ...         "prompt": Scaled(jnp.ones(3))}
        >>> unload(base)["layers"]["mlp"]["up_proj"]["kernel"].shape, list(unload(base))
        ((2,), ['layers'])
    """
    kept = {k: v for k, v in params.items() if k in BASE_ENTRIES}
    if isinstance(kept.get("layers"), dict):
        kept["layers"] = {k: v for k, v in kept["layers"].items() if k in LAYER_ENTRIES}
    return jax.tree.map(lambda x: x.unloaded() if _is_node(x) else x, kept, is_leaf=_is_node)


def adapter_count(params: Params) -> int:
    """How many named adapters ``params`` hold (1 + the largest adapter index; 0: none).

    Example:
        >>> adapter_count({"embed_tokens": {"embedding": jnp.ones((2, 2))}})
        0
    """
    nodes = filter(_is_node, jax.tree.leaves(params, is_leaf=_is_node))
    return 1 + max((i for n in nodes for i in n.adapter_indices()), default=-1)


def check_adapter_ids(params: Params, adapter_ids: Any) -> None:
    """Refuse per-row adapter ids outside ``-1 .. n_adapters - 1`` (``-1``: the base alone).

    Concrete ids (NumPy, or JAX arrays outside a trace) raise ``ValueError`` naming the
    rows, their ids and the adapter count. Traced ids (inside ``jax.jit``) add a
    ``jax.experimental.checkify`` check instead, which needs the jitted function to be
    wrapped in ``checkify.checkify`` (JAX refuses an unwrapped check with a
    ``ValueError`` at trace time); ``err.throw()`` then raises for bad ids.

    Example:
        >>> from jax.experimental import checkify
        >>> params = {"embed_tokens": {"embedding": jnp.ones((2, 2))}}
        >>> check_adapter_ids(params, [-1, -1])
        >>> try:
        ...     check_adapter_ids(params, [0, -1])
        ... except ValueError as e:
        ...     print(str(e)[:47])
        adapter_ids: rows [0] have ids [0]; params hold
        >>> def apply(ids):
        ...     check_adapter_ids(params, ids)
        ...     return ids + 1
        >>> err, out = checkify.checkify(jax.jit(apply))(jnp.array([3, -1]))
        >>> err.get().splitlines()[0][:40]
        'adapter_ids: some ids are outside -1..-1'
    """
    n = adapter_count(params)
    if isinstance(adapter_ids, jax.core.Tracer):
        ok = jnp.all((adapter_ids >= -1) & (adapter_ids < n))
        checkify.check(
            ok,
            f"adapter_ids: some ids are outside -1..{n - 1} (params hold {n} adapters): {{ids}}",
            ids=adapter_ids,
        )
        return
    ids = np.asarray(adapter_ids)
    bad = np.flatnonzero((ids < -1) | (ids >= n))
    if bad.size:
        raise ValueError(
            f"adapter_ids: rows {bad.tolist()} have ids {ids[bad].tolist()}; params hold {n} "
            f"adapters, so each id must be in -1..{n - 1} (-1: the base model)"
        )


def for_call(params: Params, ctx: Context) -> Params:
    """The params one forward call runs on: the base alone when ``ctx.disable_adapters``.

    Checks concrete ``ctx.adapter_ids`` (:func:`check_adapter_ids`); traced ones pass
    unchecked (see the module docstring).

    Example:
        >>> for_call({"embed_tokens": {}, "prompt": ParamNode()}, Context(disable_adapters=True))
        {'embed_tokens': {}}
    """
    if ctx.disable_adapters:
        return unload(params)
    if ctx.adapter_ids is not None and not isinstance(ctx.adapter_ids, jax.core.Tracer):
        check_adapter_ids(params, ctx.adapter_ids)
    return params
