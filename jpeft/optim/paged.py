"""Paged optimizers, the JAX way: optimizer state that lives in host memory.

bitsandbytes' paged optimizers keep their state in CUDA unified memory and let the driver page
it out to the host under memory pressure. JAX has no unified-memory oversubscription, so the
faithful analogue is state that is *stored* in pinned host memory (``memory_kind="pinned_host"``)
and brought to the accelerator only for the update: :func:`paged` wraps any optax
transformation so that ``init`` returns host-resident state and ``update`` moves the state to
device memory, runs the wrapped update and moves the new state back. Inside ``jax.jit`` these
moves are device-to-host / host-to-device copies scheduled by XLA.

:func:`conditional_update` (what :func:`jpeft.train.train_step` calls) streams such a state
through the update one parameter at a time, so that only about one parameter's state is in
device memory at once, and keeps the old state when a step is skipped, deciding in device
memory (XLA cannot select between host-memory buffers on the device).

CPU devices have a ``pinned_host`` memory too (the same RAM): offloading works there, so
that the path a GPU or TPU takes is the one the tests run.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jpeft.optim.state_map import SHARED, param_groups

HOST_MEMORY_KIND = "pinned_host"
Tree = Any


def host_offload_supported(device: jax.Device | None = None) -> bool:
    """Whether ``device`` (default: the first device) has a ``pinned_host`` memory space.

    Example:
        >>> host_offload_supported()  # CPU, GPU and TPU devices have one
        True
    """
    device = jax.devices()[0] if device is None else device
    return HOST_MEMORY_KIND in {memory.kind for memory in device.addressable_memories()}


def to_host(tree: optax.OptState) -> optax.OptState:
    """Move every array of ``tree`` to pinned host memory, keeping its sharding. Works in jit.

    Example:
        >>> import jax.numpy as jnp
        >>> to_host({"m": jnp.zeros(3)})["m"].sharding.memory_kind
        'pinned_host'
    """
    return jax.device_put(tree, jax.memory.Space.Host)


def to_device(tree: optax.OptState) -> optax.OptState:
    """Move every array of ``tree`` to device memory, keeping its sharding. Works in jit.

    Example:
        >>> import jax.numpy as jnp
        >>> to_device(to_host({"m": jnp.zeros(3)}))["m"].sharding.memory_kind
        'device'
    """
    return jax.device_put(tree, jax.memory.Space.Device)


def state_memory_kinds(tx: optax.GradientTransformation, params: Tree) -> Tree:
    """The memory kind of each leaf of ``tx.init(params)``: ``"pinned_host"`` or None (device).

    Read from the traced ``init``, so ``params`` may be abstract (``jax.ShapeDtypeStruct``).

    Example:
        >>> import jax.numpy as jnp
        >>> state_memory_kinds(paged(optax.sgd(0.1, momentum=0.9)), {"w": jnp.zeros(2)})
        (TraceState(trace={'w': 'pinned_host'}), EmptyState())
    """
    closed, shape = jax.make_jaxpr(tx.init, return_shape=True)(params)
    kinds = [
        HOST_MEMORY_KIND if a.memory_space == jax.memory.Space.Host else None
        for a in closed.out_avals
    ]
    return jax.tree.unflatten(jax.tree.structure(shape), kinds)


def offloads_state(tx: optax.GradientTransformation, params: Tree) -> bool:
    """Whether ``tx`` keeps any of its state in pinned host memory (e.g. :func:`paged`'s).

    ``params`` may be abstract (``jax.ShapeDtypeStruct``).

    Example:
        >>> import jax.numpy as jnp
        >>> params = {"w": jnp.zeros(2)}
        >>> offloads_state(paged(optax.adam(0.1)), params), offloads_state(optax.adam(0.1), params)
        (True, False)
    """
    shapes = jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype), params)
    return HOST_MEMORY_KIND in jax.tree.leaves(state_memory_kinds(tx, shapes))


def paged(
    tx: optax.GradientTransformation, offload: bool | None = None
) -> optax.GradientTransformation:
    """Keep the optimizer state of ``tx`` in pinned host memory between updates.

    Args:
        tx: any optax transformation, e.g. :func:`jpeft.optim.adamw_8bit`.
        offload: ``None`` offloads when :func:`host_offload_supported`; ``True`` always
            offloads; ``False`` returns ``tx`` unchanged.

    Returns:
        A transformation with the same state structure and the same results as ``tx``.
        Its own ``update`` moves the whole state at once; :func:`conditional_update` (the
        train step's) streams it parameter by parameter.

    To donate the offloaded state, give ``jax.jit`` both ``in_shardings`` and
    ``out_shardings`` (the state's are ``jax.tree.map(lambda x: x.sharding, state)``;
    :func:`jpeft.train.sharding.sharded_train_step` does). Without them jit cannot see memory
    kinds when it pairs donated inputs with outputs, may alias a host buffer to a
    same-shaped device output, and the run aborts with "PjRtBuffer's memory kind does not
    match sharding's memory kind" (seen with jax 0.10 on CPU).

    Raises:
        ValueError: ``offload=True`` on a backend without a ``pinned_host`` memory space.

    Example:
        >>> import jax, jax.numpy as jnp, optax
        >>> params = {"w": jnp.ones((4, 4))}
        >>> tx = paged(optax.adamw(1e-3))
        >>> state = tx.init(params)
        >>> state[0].mu["w"].sharding.memory_kind
        'pinned_host'
        >>> updates, state = jax.jit(tx.update)(params, state, params)
        >>> state[0].nu["w"].sharding.memory_kind, updates["w"].sharding.memory_kind
        ('pinned_host', 'device')
    """
    supported = host_offload_supported()
    if offload is None:
        offload = supported
    if not offload:
        return tx
    if not supported:
        kinds = {memory.kind for memory in jax.devices()[0].addressable_memories()}
        raise ValueError(
            f"offload: the {jax.default_backend()} backend has no {HOST_MEMORY_KIND!r} memory "
            f"(found {sorted(kinds)}); pass offload=None or False"
        )

    inner = optax.with_extra_args_support(tx)

    def init_fn(params: optax.Params) -> optax.OptState:
        return to_host(inner.init(params))

    def update_fn(
        updates: optax.Updates,
        state: optax.OptState,
        params: optax.Params | None = None,
        **extra_args: Any,
    ) -> tuple[optax.Updates, optax.OptState]:
        updates, state = inner.update(updates, to_device(state), params, **extra_args)
        return updates, to_host(state)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def conditional_update(
    tx: optax.GradientTransformation,
    apply: jax.Array,
    updates: optax.Updates,
    state: optax.OptState,
    params: optax.Params | None = None,
) -> tuple[optax.Updates, optax.OptState]:
    """``tx.update(updates, state, params)``, keeping the old state where ``apply`` is False.

    ``apply`` is a bool scalar (e.g. "the loss and gradients are finite"); the updates are
    returned as computed either way. Each new state leaf comes back in the memory ``tx``
    keeps it in. When ``tx`` keeps state in host memory (:func:`paged`), the update runs once
    per parameter that owns state (XLA keeps, of each run, only that parameter's part), and
    each run fetches its parameter's state only after the previous one has been written
    back, so that device memory holds about one parameter's state at a time; the smallest
    states go first, so that the largest come when most gradients are already used and
    freed. The choice between old and new state is made in device memory, before the
    write-back.

    Example:
        >>> import jax.numpy as jnp
        >>> tx = paged(optax.adam(0.1))
        >>> params = {"a": jnp.ones(2), "b": jnp.ones(3)}
        >>> state = tx.init(params)
        >>> _, kept = jax.jit(conditional_update, static_argnums=0)(
        ...     tx, jnp.bool_(False), params, state, params)
        >>> int(kept[0].count), kept[0].mu["b"].sharding.memory_kind
        (0, 'pinned_host')
    """
    select = lambda new, old: jnp.where(apply, new, old)
    leaves, treedef = jax.tree.flatten(state)
    # where tx keeps each leaf (the state passed in may sit elsewhere, e.g. unplaced)
    like = updates if params is None else params
    shapes = jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype), like)
    host = [
        kind == HOST_MEMORY_KIND for kind in treedef.flatten_up_to(state_memory_kinds(tx, shapes))
    ]
    if not any(host):
        new_updates, new_state = tx.update(updates, state, params)
        return new_updates, jax.tree.map(select, new_state, state)
    try:
        groups = param_groups(tx, state, updates)
    except (ValueError, TypeError):  # per-parameter entries of an unknown structure
        groups = [0] * len(leaves)
    update_leaves, update_def = jax.tree.flatten(updates)
    out: list[Any] = list(leaves)
    new_updates = list(update_leaves)
    token: list[Any] = []
    # smallest state first: a group's gradient is freed once its update is done, so the
    # largest states are fetched when the fewest gradients are still waiting
    size = lambda g: sum(
        np.size(leaves[i]) * np.dtype(leaves[i].dtype).itemsize
        for i, h in enumerate(groups)
        if h == g
    )
    order = sorted(set(groups) - {SHARED}, key=lambda g: (size(g), g))
    order += [SHARED] if SHARED in groups else []
    for group in order:
        mine = [i for i, g in enumerate(groups) if g == group]
        fetched = [leaves[i] for i in mine]
        if token:  # fetch this group only once the previous one is written back
            fetched, _ = jax.lax.optimization_barrier((fetched, token))
        device = [to_device(leaf) for leaf in leaves]
        for i, leaf in zip(mine, fetched, strict=True):
            device[i] = to_device(leaf)
        step_updates, new_state = tx.update(updates, treedef.unflatten(device), params)
        new_leaves = treedef.flatten_up_to(new_state)
        for i in mine:
            kept = select(to_device(new_leaves[i]), device[i])
            out[i] = to_host(kept) if host[i] else kept
        token = [out[i] for i in mine]
        step_leaves = update_def.flatten_up_to(step_updates)
        if group != SHARED:
            new_updates[group] = step_leaves[group]
    for index in set(range(len(update_leaves))) - set(groups):  # parameters without state
        new_updates[index] = step_leaves[index]
    return update_def.unflatten(new_updates), treedef.unflatten(out)
