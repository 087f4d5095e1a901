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
from jpeft.optim.paged import conditional_update, offloads_state, to_device, to_host
from jpeft.partition import combine
from jpeft.train.loss import chunked_token_loss, token_loss
from jpeft.train.state import TrainState

Batch = dict[str, jax.Array]

REQUIRED_KEYS = ("input_ids", "attention_mask", "loss_mask")
ROW_KEYS = ("position_ids", "segment_ids")
EXAMPLE_KEYS = ("adapter_ids", "task_ids")


def _targets(batch: Mapping[str, jax.Array]) -> tuple[jax.Array, ...]:
    keys = ("input_ids", "loss_mask", "attention_mask")
    return (*(batch[k] for k in keys), batch.get("segment_ids"))


def batch_loss(logits: jax.Array, batch: Mapping[str, jax.Array]) -> tuple[jax.Array, jax.Array]:
    """:func:`jpeft.train.loss.token_loss` of a batch: ``input_ids``, ``loss_mask``,
    ``attention_mask`` and, for packed rows, ``segment_ids``.

    Example:
        >>> ids = jnp.array([[0, 1, 2]])
        >>> batch = {"input_ids": ids, "loss_mask": ids > 0, "attention_mask": ids >= 0}
        >>> int(batch_loss(jnp.zeros((1, 3, 4)), batch)[1])
        2
    """
    return token_loss(logits, *_targets(batch))


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
    """Loss sum and target count from the model's hidden states, the logits chunk by chunk
    (:func:`jpeft.train.loss.chunked_token_loss`); chunk ``i`` draws lm_head dropout from
    ``fold_in(rng, i)``."""
    params = combine(trainable, frozen)
    examples = {k: batch[k] for k in EXAMPLE_KEYS if k in batch}
    kwargs = {k: batch[k] for k in ("attention_mask", *ROW_KEYS) if k in batch}
    dropout = {} if rng is None else {"deterministic": False, "rngs": {"dropout": rng}}
    hidden = state.apply_fn(
        {"params": params}, batch["input_ids"], **kwargs, **examples, **dropout, return_hidden=True
    )

    def head(trained: Tree, h: jax.Array, index: jax.Array) -> jax.Array:
        variables = {"params": combine(trained, frozen)}
        if rng is None:
            return state.apply_fn(variables, h, **examples, method="logits")
        rngs = {"dropout": jax.random.fold_in(rng, index)}
        return state.apply_fn(
            variables, h, **examples, deterministic=False, rngs=rngs, method="logits"
        )

    return chunked_token_loss(hidden, head, trainable, *_targets(batch))


def _micro_batches(batch: Batch, k: int) -> Batch:
    """``[B, ...] -> [k, B/k, ...]``; micro-batch ``j`` takes rows ``j, j+k, ...``.

    Taking strided rows keeps every micro-batch spread over all data-parallel shards.
    """
    return {
        key: x.reshape(x.shape[0] // k, k, *x.shape[1:]).swapaxes(0, 1) for key, x in batch.items()
    }


def _host_layers(state: TrainState) -> Tree | None:
    """``state.trainable`` with its layer stacks in host memory, for an optimizer that keeps
    its state there (:func:`jpeft.optim.paged`); None otherwise.

    The gradient is taken of this tree: the layer scan brings each layer's slice to the
    device, so each layer's gradient goes back to host memory as the backward scan makes it
    and the gradient stack (fp32, as large as the trainable layers: 0.64 GB at 7B QLoRA r=64)
    builds up there instead of beside the backward pass's activations. It comes back to the
    device after the backward pass, where the clip and the update read it. The values are
    the same; only where the stacks wait changes.
    """
    trainable = state.trainable
    if not (isinstance(trainable, Mapping) and "layers" in trainable):
        return None
    if not offloads_state(state.tx, trainable):
        return None
    return {**trainable, "layers": to_host(trainable["layers"])}


def _summed_grads(
    state: TrainState, frozen: Tree, batch: Batch, accum: int
) -> tuple[jax.Array, jax.Array, Tree]:
    """``(loss sum, target count, gradient of the loss sum)`` over ``accum`` micro-batches;
    the gradient in device memory (see :func:`_host_layers` for where it is built)."""
    value_and_grad = jax.value_and_grad(_loss_sum, has_aux=True)
    host_layers = _host_layers(state)
    trainable = state.trainable if host_layers is None else host_layers

    def grad_fn(micro: Batch, rng: jax.Array) -> tuple[tuple[jax.Array, jax.Array], Tree]:
        aux, grads = value_and_grad(trainable, state, frozen, micro, rng)
        return aux, grads if host_layers is None else to_device(grads)

    step_rng = jax.random.fold_in(state.rng, state.step)
    if accum == 1:
        (total, count), grads = grad_fn(batch, jax.random.fold_in(step_rng, 0))
        return total, count, grads

    def body(carry, xs):
        index, micro = xs
        (total, count), grads = grad_fn(micro, jax.random.fold_in(step_rng, index))
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
    ``tokens`` (int32 target count) and ``learning_rate``, the rate this update used,
    when ``state.tx`` is built with ``optax.inject_hyperparams``.

    Example:
        >>> import jpeft
        >>> from jpeft.models import hf
        >>> from jpeft.train.build import create_state
        >>> from jpeft.train.config import RunConfig
        >>> cfg, base = hf.load_pretrained("assets/tiny-llama")
        >>> trainable, frozen = jpeft.split(jpeft.LoRA(r=2).init(jax.random.key(0), base, cfg))
        >>> state = create_state(RunConfig(), trainable, cfg)
        >>> batch = {k: jnp.ones((2, 8), jnp.int32)
        ...          for k in ("input_ids", "attention_mask", "loss_mask")}
        >>> step = jax.jit(train_step, donate_argnums=0)
        >>> state, metrics = step(state, frozen, batch)
        >>> int(state.step), int(metrics["tokens"])
        (1, 14)
    """
    accum = state.grad_accum_steps if accum is None else accum
    check_batch(batch, accum)
    total, count, grads = _summed_grads(state, frozen, batch, accum)
    denom = jnp.maximum(count, 1.0)
    grads = jax.tree.map(lambda g: g / denom, grads)
    loss = total / denom
    grad_norm = optax.tree.norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    # keeps the old optimizer state unless finite (in device memory, for host-memory state)
    updates, opt_state = conditional_update(
        state.tx, finite, grads, state.opt_state, state.trainable
    )
    trainable = optax.apply_updates(state.trainable, updates)

    keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)
    new_state = state.replace(
        step=jnp.where(finite, state.step + 1, state.step),
        trainable=keep(trainable, state.trainable),
        opt_state=opt_state,
    )
    metrics = {"loss": loss, "grad_norm": grad_norm, "tokens": count.astype(jnp.int32)}
    learning_rate = optax.tree_utils.tree_get(  # the value, not its schedule's state
        opt_state, "learning_rate", filtering=lambda _, value: hasattr(value, "dtype")
    )
    if learning_rate is not None:
        metrics["learning_rate"] = jnp.asarray(learning_rate, jnp.float32)
    return new_state, metrics


def eval_step(state: TrainState, frozen: Tree, batch: Batch) -> dict[str, jax.Array]:
    """Deterministic (no dropout) ``loss``, ``loss_sum`` and ``tokens`` of ``batch``.

    Sum ``loss_sum`` and ``tokens`` over an eval set for its mean loss.

    Example:
        >>> import jpeft
        >>> from jpeft.models import hf
        >>> from jpeft.train.build import create_state
        >>> from jpeft.train.config import RunConfig
        >>> cfg, base = hf.load_pretrained("assets/tiny-llama")
        >>> trainable, frozen = jpeft.split(jpeft.LoRA(r=2).init(jax.random.key(0), base, cfg))
        >>> state = create_state(RunConfig(), trainable, cfg)
        >>> batch = {k: jnp.ones((2, 8), jnp.int32)
        ...          for k in ("input_ids", "attention_mask", "loss_mask")}
        >>> metrics = jax.jit(eval_step)(state, frozen, batch)
        >>> int(metrics["tokens"])
        14
    """
    check_batch(batch)
    total, count = _loss_sum(state.trainable, state, frozen, batch, None)
    return {
        "loss": total / jnp.maximum(count, 1.0),
        "loss_sum": total,
        "tokens": count.astype(jnp.int32),
    }
