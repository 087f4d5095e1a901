"""One optimizer step on the trainable partition: next-token loss, gradients, update.

``train_step`` is a pure function; jit it with the state donated::

    step = jax.jit(train_step, donate_argnums=0)
    state, metrics = step(state, frozen, batch)

A batch is a dict of int32 arrays: ``input_ids``, ``attention_mask`` and
``loss_mask`` ``[B, T]``, plus optionally ``position_ids`` and ``segment_ids``
``[B, T]`` (packed rows) and ``adapter_ids`` / ``task_ids`` ``[B]``.
"""

from __future__ import annotations

from collections.abc import Mapping

import jax
import jax.numpy as jnp
import optax

from jpeft.models.pytree import Tree
from jpeft.partition import combine
from jpeft.train.state import TrainState

Batch = dict[str, jax.Array]

REQUIRED_KEYS = ("input_ids", "attention_mask", "loss_mask")
ROW_KEYS = ("position_ids", "segment_ids")
EXAMPLE_KEYS = ("adapter_ids", "task_ids")


def token_loss(
    logits: jax.Array,
    input_ids: jax.Array,
    loss_mask: jax.Array,
    attention_mask: jax.Array | None = None,
    segment_ids: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array]:
    """``(sum of fp32 cross-entropy over targets, number of targets)``.

    The logits at ``t - 1`` predict token ``t``; token ``t`` is a target when
    ``loss_mask[t] == 1``, it is not padding (``attention_mask[t] == 1``) and, in a
    packed row, it is in the same segment as token ``t - 1``.

    Example:
        >>> logits = jnp.zeros((1, 3, 4))
        >>> ids, lm = jnp.array([[0, 1, 2]]), jnp.array([[0, 1, 1]])
        >>> total, n = token_loss(logits, ids, lm)
        >>> round(float(total / n), 4), int(n)
        (1.3863, 2)
    """
    weights = loss_mask[:, 1:].astype(jnp.float32)
    if attention_mask is not None:
        weights = weights * (attention_mask[:, 1:] > 0)
    if segment_ids is not None:
        weights = weights * (segment_ids[:, 1:] == segment_ids[:, :-1])
    ce = optax.softmax_cross_entropy_with_integer_labels(
        logits[:, :-1].astype(jnp.float32), input_ids[:, 1:]
    )
    return jnp.sum(ce * weights), jnp.sum(weights)


def batch_loss(logits: jax.Array, batch: Mapping[str, jax.Array]) -> tuple[jax.Array, jax.Array]:
    """:func:`token_loss` of a batch: ``input_ids``, ``loss_mask``, ``attention_mask``
    and, for packed rows, ``segment_ids``.

    Example:
        >>> ids = jnp.array([[0, 1, 2]])
        >>> batch = {"input_ids": ids, "loss_mask": ids > 0, "attention_mask": ids >= 0}
        >>> int(batch_loss(jnp.zeros((1, 3, 4)), batch)[1])
        2
    """
    return token_loss(
        logits,
        batch["input_ids"],
        batch["loss_mask"],
        batch["attention_mask"],
        batch.get("segment_ids"),
    )


def check_batch(batch: Batch, accum: int = 1) -> None:
    """Raise ValueError unless ``batch`` has the keys and shapes a step expects.

    Example:
        >>> ids = jnp.zeros((2, 5), jnp.int32)
        >>> check_batch({"input_ids": ids, "attention_mask": ids, "loss_mask": ids}, accum=2)
    """
    missing = [k for k in REQUIRED_KEYS if k not in batch]
    if missing:
        raise ValueError(f"batch is missing {missing}; it has {sorted(batch)}")
    unknown = sorted(set(batch) - {*REQUIRED_KEYS, *ROW_KEYS, *EXAMPLE_KEYS})
    if unknown:
        valid = [*REQUIRED_KEYS, *ROW_KEYS, *EXAMPLE_KEYS]
        raise ValueError(f"batch has unknown keys {unknown}; valid keys are {valid}")
    shape = tuple(batch["input_ids"].shape)
    if len(shape) != 2:
        raise ValueError(f"batch['input_ids'] must be [B, T], got shape {shape}")
    for key in (*REQUIRED_KEYS, *ROW_KEYS):
        if key in batch and tuple(batch[key].shape) != shape:
            raise ValueError(
                f"batch[{key!r}] has shape {tuple(batch[key].shape)}, expected {shape}"
            )
    for key in EXAMPLE_KEYS:
        if key in batch and tuple(batch[key].shape) != shape[:1]:
            raise ValueError(
                f"batch[{key!r}] has shape {tuple(batch[key].shape)}, expected {shape[:1]}"
            )
    if shape[0] % accum:
        raise ValueError(f"batch size {shape[0]} is not a multiple of accumulation steps {accum}")


def _loss_sum(
    trainable: Tree, state: TrainState, frozen: Tree, batch: Batch, rng: jax.Array | None
) -> tuple[jax.Array, jax.Array]:
    params = combine(trainable, frozen)
    kwargs = {k: batch[k] for k in ("attention_mask", *ROW_KEYS, *EXAMPLE_KEYS) if k in batch}
    if rng is None:
        logits = state.apply_fn({"params": params}, batch["input_ids"], **kwargs)
    else:
        logits = state.apply_fn(
            {"params": params},
            batch["input_ids"],
            **kwargs,
            deterministic=False,
            rngs={"dropout": rng},
        )
    return batch_loss(logits, batch)


def _micro_batches(batch: Batch, k: int) -> Batch:
    """``[B, ...] -> [k, B/k, ...]``; micro-batch ``j`` takes rows ``j, j+k, ...``.

    Taking strided rows keeps every micro-batch spread over all data-parallel shards.
    """
    return {
        key: x.reshape(x.shape[0] // k, k, *x.shape[1:]).swapaxes(0, 1) for key, x in batch.items()
    }


def _summed_grads(
    state: TrainState, frozen: Tree, batch: Batch, accum: int
) -> tuple[jax.Array, jax.Array, Tree]:
    """``(loss sum, target count, gradient of the loss sum)`` over ``accum`` micro-batches."""
    grad_fn = jax.value_and_grad(_loss_sum, has_aux=True)
    step_rng = jax.random.fold_in(state.rng, state.step)
    if accum == 1:
        (total, count), grads = grad_fn(
            state.trainable, state, frozen, batch, jax.random.fold_in(step_rng, 0)
        )
        return total, count, grads

    def body(carry, xs):
        index, micro = xs
        (total, count), grads = grad_fn(
            state.trainable, state, frozen, micro, jax.random.fold_in(step_rng, index)
        )
        return jax.tree.map(jnp.add, carry, (total, count, grads)), None

    zeros = (jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32))
    init = (*zeros, jax.tree.map(jnp.zeros_like, state.trainable))
    carry, _ = jax.lax.scan(body, init, (jnp.arange(accum), _micro_batches(batch, accum)))
    return carry


def train_step(
    state: TrainState, frozen: Tree, batch: Batch, *, accum: int | None = None
) -> tuple[TrainState, dict[str, jax.Array]]:
    """One update of ``state.trainable`` on the mean next-token loss of ``batch``.

    The loss is the mean over all target tokens of the whole batch; with ``accum``
    micro-batches (default ``state.grad_accum_steps``) the gradient is the sum of
    the micro-batch loss-sum gradients divided by the total target count, i.e.
    the full-batch gradient. Dropout uses ``fold_in(fold_in(rng, step), micro)``.
    If the loss or gradient is not finite the state comes back unchanged (so it
    is still the last good one) and ``metrics["loss"]`` shows the NaN/inf.

    Metrics: ``loss`` (fp32), ``grad_norm`` (global norm before any clipping),
    ``tokens`` (int32 target count) and ``learning_rate`` when the state has a
    schedule.

    Example:
        >>> # step = jax.jit(train_step, donate_argnums=0)
        >>> # state, metrics = step(state, frozen, batch)
    """
    accum = state.grad_accum_steps if accum is None else accum
    check_batch(batch, accum)
    total, count, grads = _summed_grads(state, frozen, batch, accum)
    denom = jnp.maximum(count, 1.0)
    grads = jax.tree.map(lambda g: g / denom, grads)
    loss = total / denom
    grad_norm = optax.tree.norm(grads)
    updates, opt_state = state.tx.update(grads, state.opt_state, state.trainable)
    trainable = optax.apply_updates(state.trainable, updates)

    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)
    new_state = state.replace(
        step=jnp.where(finite, state.step + 1, state.step),
        trainable=keep(trainable, state.trainable),
        opt_state=keep(opt_state, state.opt_state),
    )
    metrics = {"loss": loss, "grad_norm": grad_norm, "tokens": count.astype(jnp.int32)}
    if state.lr_schedule is not None:
        metrics["learning_rate"] = jnp.asarray(state.lr_schedule(state.step), jnp.float32)
    return new_state, metrics


def eval_step(state: TrainState, frozen: Tree, batch: Batch) -> dict[str, jax.Array]:
    """Deterministic (no dropout) ``loss``, ``loss_sum`` and ``tokens`` of ``batch``.

    Sum ``loss_sum`` and ``tokens`` over an eval set for its mean loss.

    Example:
        >>> # metrics = jax.jit(eval_step)(state, frozen, batch)
    """
    check_batch(batch)
    total, count = _loss_sum(state.trainable, state, frozen, batch, None)
    return {
        "loss": total / jnp.maximum(count, 1.0),
        "loss_sum": total,
        "tokens": count.astype(jnp.int32),
    }
