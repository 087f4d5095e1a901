"""AdamW with 8-bit optimizer states, following bitsandbytes' ``AdamW8bit``.

Both Adam moments are stored blockwise-quantized with the dynamic 8-bit map
(:mod:`jpeft.quant.dynamic`): the first moment with the signed map, the second with the
unsigned map, ``blocksize`` values per float32 absmax. Each step dequantizes the moments,
updates them in float32, computes the Adam direction from those float32 moments and only then
re-quantizes them with fresh per-block absmax, exactly as bitsandbytes does. Tensors with fewer
than ``min_8bit_size`` elements keep float32 moments. A quantized moment takes about 1.016 bytes
per element instead of 4.

The state is a pytree of arrays, so it can be jitted, donated, sharded and checkpointed.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from jpeft.quant.dynamic import dequantize_blockwise, dynamic_map, quantize_blockwise


class QuantizedMoment(NamedTuple):
    """One blockwise 8-bit moment: uint8 ``codes [numel]`` and float32 ``absmax [nblocks]``."""

    codes: jax.Array
    absmax: jax.Array


class ScaleByAdam8bitState(NamedTuple):
    """State of :func:`scale_by_adam_8bit`.

    ``mu`` and ``nu`` mirror the parameter tree; each leaf is a float32 array (small tensors) or
    a :class:`QuantizedMoment`.
    """

    count: jax.Array
    mu: Any
    nu: Any


def _check_hyperparameters(
    b1: float, b2: float, eps: float, blocksize: int, min_8bit_size: int
) -> None:
    for name, beta in (("b1", b1), ("b2", b2)):
        if not 0.0 <= beta < 1.0:
            raise ValueError(f"{name}: expected a value in [0, 1), found {beta}")
    if eps < 0.0:
        raise ValueError(f"eps: expected a value >= 0, found {eps}")
    if not isinstance(blocksize, int) or blocksize <= 0:
        raise ValueError(f"blocksize: expected a positive int, found {blocksize!r}")
    if not isinstance(min_8bit_size, int) or min_8bit_size < 0:
        raise ValueError(f"min_8bit_size: expected an int >= 0, found {min_8bit_size!r}")


def scale_by_adam_8bit(
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    blocksize: int = 256,
    min_8bit_size: int = 4096,
) -> optax.GradientTransformation:
    """Adam scaling (``m_hat / (sqrt(v_hat) + eps)``) with blockwise 8-bit moments.

    Args:
        b1: decay of the first moment.
        b2: decay of the second moment.
        eps: added to ``sqrt(v_hat)``.
        blocksize: values per quantization block (bitsandbytes uses 256).
        min_8bit_size: tensors with fewer elements keep float32 moments.

    Example:
        >>> import jax.numpy as jnp
        >>> tx = scale_by_adam_8bit(min_8bit_size=8)
        >>> params = {"w": jnp.ones((4, 4)), "b": jnp.ones(3)}
        >>> state = tx.init(params)
        >>> type(state.mu["w"]).__name__, state.mu["b"].dtype
        ('QuantizedMoment', dtype('float32'))
        >>> updates, state = tx.update(params, state)
        >>> round(float(updates["w"][0, 0]), 4)
        1.0
    """
    _check_hyperparameters(b1, b2, eps, blocksize, min_8bit_size)
    signed = jnp.asarray(dynamic_map(signed=True))
    unsigned = jnp.asarray(dynamic_map(signed=False))

    def init_moment(param: jax.Array) -> jax.Array | QuantizedMoment:
        if param.size < min_8bit_size:
            return jnp.zeros(param.shape, jnp.float32)
        return QuantizedMoment(
            codes=jnp.zeros((param.size,), jnp.uint8),
            absmax=jnp.zeros((math.ceil(param.size / blocksize),), jnp.float32),
        )

    def init_fn(params: optax.Params) -> ScaleByAdam8bitState:
        return ScaleByAdam8bitState(
            count=jnp.zeros([], jnp.int32),
            mu=jax.tree.map(init_moment, params),
            nu=jax.tree.map(init_moment, params),
        )

    def load(
        moment: jax.Array | QuantizedMoment, code: jax.Array, shape: tuple[int, ...]
    ) -> jax.Array:
        if isinstance(moment, QuantizedMoment):
            return dequantize_blockwise(moment.codes, moment.absmax, code, blocksize, shape)
        return moment

    def store(
        moment: jax.Array, code: jax.Array, like: jax.Array | QuantizedMoment
    ) -> jax.Array | QuantizedMoment:
        if isinstance(like, QuantizedMoment):
            return QuantizedMoment(*quantize_blockwise(moment, code, blocksize))
        return moment

    def update_fn(
        updates: optax.Updates, state: ScaleByAdam8bitState, params: optax.Params | None = None
    ) -> tuple[optax.Updates, ScaleByAdam8bitState]:
        del params
        count = optax.safe_increment(state.count)
        step = count.astype(jnp.float32)
        correction1 = 1.0 - jnp.float32(b1) ** step
        correction2 = jnp.sqrt(1.0 - jnp.float32(b2) ** step)

        grads, treedef = jax.tree.flatten(updates)
        mus = treedef.flatten_up_to(state.mu)
        nus = treedef.flatten_up_to(state.nu)
        new_updates, new_mus, new_nus = [], [], []
        for grad, mu, nu in zip(grads, mus, nus, strict=True):
            g = grad.astype(jnp.float32)
            m = jnp.float32(b1) * load(mu, signed, grad.shape) + jnp.float32(1.0 - b1) * g
            v = jnp.float32(b2) * load(nu, unsigned, grad.shape) + jnp.float32(1.0 - b2) * g * g
            direction = (m / correction1) / (jnp.sqrt(v) / correction2 + jnp.float32(eps))
            new_updates.append(direction.astype(grad.dtype))
            new_mus.append(store(m, signed, mu))
            new_nus.append(store(v, unsigned, nu))
        return treedef.unflatten(new_updates), ScaleByAdam8bitState(
            count=count, mu=treedef.unflatten(new_mus), nu=treedef.unflatten(new_nus)
        )

    return optax.GradientTransformation(init_fn, update_fn)


def adamw_8bit(
    learning_rate: optax.ScalarOrSchedule,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 0.01,
    blocksize: int = 256,
    min_8bit_size: int = 4096,
    mask: Any = None,
) -> optax.GradientTransformation:
    """AdamW with bitsandbytes ``AdamW8bit`` semantics (8-bit blockwise moments).

    Same structure as :func:`optax.adamw`: :func:`scale_by_adam_8bit`, then decoupled weight
    decay (``mask`` selects the decayed leaves, as in optax), then the learning rate, which may
    be a schedule.

    Example:
        >>> import jax, jax.numpy as jnp, optax
        >>> params = {"w": jnp.ones((64, 128))}
        >>> tx = adamw_8bit(1e-3)
        >>> state = tx.init(params)
        >>> grads = jax.tree.map(jnp.ones_like, params)
        >>> updates, state = jax.jit(tx.update)(grads, state, params)
        >>> params = optax.apply_updates(params, updates)
        >>> round(float(params["w"][0, 0]), 6)  # 1 - 1e-3 * (1 + 0.01 * 1)
        0.99899
    """
    return optax.chain(
        scale_by_adam_8bit(b1, b2, eps, blocksize, min_8bit_size),
        optax.add_decayed_weights(weight_decay, mask),
        optax.scale_by_learning_rate(learning_rate),
    )
