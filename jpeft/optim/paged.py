"""Paged optimizers, the JAX way: optimizer state that lives in host memory.

bitsandbytes' paged optimizers keep their state in CUDA unified memory and let the driver page
it out to the host under memory pressure. JAX has no unified-memory oversubscription, so the
faithful analogue is state that is *stored* in pinned host memory (``memory_kind="pinned_host"``)
and brought to the accelerator only for the update: :func:`paged` wraps any optax
transformation so that ``init`` returns host-resident state and ``update`` moves the state to
device memory, runs the wrapped update and moves the new state back. Inside ``jax.jit`` these
moves are device-to-host / host-to-device copies scheduled by XLA, so the state costs
accelerator memory only while its update runs.

On a CPU backend host and device memory are the same memory, so offloading is off by default
and :func:`paged` returns the wrapped transformation unchanged.
"""

from __future__ import annotations

from typing import Any

import jax
import optax

HOST_MEMORY_KIND = "pinned_host"


def host_offload_supported(device: jax.Device | None = None) -> bool:
    """Whether ``device`` (default: the first device) is an accelerator with pinned host memory.

    Example:
        >>> import jax
        >>> host_offload_supported() == (jax.default_backend() != "cpu")  # on GPU or TPU
        True
    """
    device = jax.devices()[0] if device is None else device
    kinds = {memory.kind for memory in device.addressable_memories()}
    return device.platform != "cpu" and HOST_MEMORY_KIND in kinds


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


def paged(
    tx: optax.GradientTransformation, offload: bool | None = None
) -> optax.GradientTransformation:
    """Keep the optimizer state of ``tx`` in pinned host memory between updates.

    Args:
        tx: any optax transformation, e.g. :func:`jpeft.optim.adamw_8bit`.
        offload: ``None`` offloads when :func:`host_offload_supported`; ``True`` always
            offloads (a CPU backend accepts this, the copies are then within host memory);
            ``False`` returns ``tx`` unchanged.

    Returns:
        A transformation with the same state structure and the same results as ``tx``.

    To donate the offloaded state, give ``jax.jit`` both ``in_shardings`` and
    ``out_shardings`` (the state's are ``jax.tree.map(lambda x: x.sharding, state)``). Without
    them jit cannot see memory kinds when it pairs donated inputs with outputs, may alias a
    host buffer to a same-shaped device output, and the run aborts with "PjRtBuffer's memory
    kind does not match sharding's memory kind" (seen with jax 0.10 on CPU).

    Raises:
        ValueError: ``offload=True`` on a backend without a ``pinned_host`` memory space.

    Example:
        >>> import jax, jax.numpy as jnp, optax
        >>> params = {"w": jnp.ones((4, 4))}
        >>> tx = paged(optax.adamw(1e-3), offload=True)
        >>> state = tx.init(params)
        >>> state[0].mu["w"].sharding.memory_kind
        'pinned_host'
        >>> updates, state = jax.jit(tx.update)(params, state, params)
        >>> state[0].nu["w"].sharding.memory_kind, updates["w"].sharding.memory_kind
        ('pinned_host', 'device')
    """
    if offload is None:
        offload = host_offload_supported()
    if not offload:
        return tx
    kinds = {memory.kind for memory in jax.devices()[0].addressable_memories()}
    if HOST_MEMORY_KIND not in kinds:
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
