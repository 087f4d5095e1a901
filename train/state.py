"""The training state: trainable params, optimizer state, step and dropout key.

Only the trainable partition of the params (see :func:`jpeft.split`) lives in
the state; the frozen base is passed to every step separately, so it gets no
gradient buffers, no optimizer state and never enters a checkpoint.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import struct

from jpeft.models.pytree import Tree


@struct.dataclass
class TrainState:
    """Everything a training step changes, as one pytree.

    Attributes:
        step: int32 scalar, the number of updates applied so far.
        trainable: the trainable partition of the params (fp32 for mixed precision).
        opt_state: ``tx.init(trainable)``.
        rng: base dropout key; step ``s`` uses ``fold_in(rng, s)``, so a resumed run
            draws exactly the same masks as an uninterrupted one.
        apply_fn: ``model.apply`` of a :class:`jpeft.models.llama.Llama` (static).
        tx: the optax optimizer (static).
        grad_accum_steps: micro-batches per step (static; see :func:`jpeft.train.train_step`).
        lr_schedule: optional ``step -> learning rate``, reported in the step metrics.

    Example:
        >>> import optax
        >>> state = TrainState.create(apply_fn=None, trainable={"w": jnp.ones(2)},
        ...                           tx=optax.sgd(0.1))
        >>> int(state.step), state.grad_accum_steps
        (0, 1)
    """

    step: jax.Array
    trainable: Tree
    opt_state: Tree
    rng: jax.Array
    apply_fn: Callable[..., Any] = struct.field(pytree_node=False)
    tx: optax.GradientTransformation = struct.field(pytree_node=False)
    grad_accum_steps: int = struct.field(pytree_node=False, default=1)
    lr_schedule: Callable[[jax.Array], jax.Array] | None = struct.field(
        pytree_node=False, default=None
    )

    @classmethod
    def create(
        cls,
        *,
        apply_fn: Callable[..., Any],
        trainable: Tree,
        tx: optax.GradientTransformation,
        rng: jax.Array | int = 0,
        grad_accum_steps: int = 1,
        lr_schedule: Callable[[jax.Array], jax.Array] | None = None,
    ) -> TrainState:
        """A fresh state at step 0 with ``tx.init(trainable)``.

        ``rng`` is a key or an integer seed. ``grad_accum_steps=k`` splits every
        batch into ``k`` micro-batches (the batch size must be a multiple of ``k``).

        Example:
            >>> import optax
            >>> s = TrainState.create(apply_fn=None, trainable={"w": jnp.ones(2)},
            ...                       tx=optax.adam(1e-3), rng=7, grad_accum_steps=4)
            >>> s.grad_accum_steps
            4
        """
        if not isinstance(grad_accum_steps, int) or grad_accum_steps < 1:
            raise ValueError(f"grad_accum_steps must be a positive int, got {grad_accum_steps!r}")
        if not jax.tree.leaves(trainable):
            raise ValueError("TrainState.create: the trainable tree holds no arrays")
        key = jax.random.key(rng) if isinstance(rng, int) else rng
        return cls(
            step=jnp.zeros((), jnp.int32),
            trainable=trainable,
            opt_state=tx.init(trainable),
            rng=key,
            apply_fn=apply_fn,
            tx=tx,
            grad_accum_steps=grad_accum_steps,
            lr_schedule=lr_schedule,
        )
