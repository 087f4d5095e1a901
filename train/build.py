"""From a :class:`RunConfig` to a training state: method, optimizer, schedule, placement."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh

import jpeft
from jpeft.models import context, llama
from jpeft.models.config import LlamaConfig
from jpeft.models.pytree import Params
from jpeft.models.tokenizer import Tokenizer
from jpeft.optim import adamw_8bit, paged
from jpeft.optim.groups import adamw, decay_mask, with_clipping
from jpeft.train import methods
from jpeft.train.config import RunConfig
from jpeft.train.sharding import sharded_train_step
from jpeft.train.state import TrainState


def method(run: RunConfig, tokenizer: Tokenizer | None = None) -> jpeft.Method:
    """The jpeft method of the run (its options over our defaults).

    Example:
        >>> method(RunConfig(method="prefix")).num_virtual_tokens
        10
    """
    return methods.build(run.method, run.options(), tokenizer)


def learning_rate(run: RunConfig) -> float:
    """The peak learning rate: ``run.lr`` or the method's default.

    Example:
        >>> learning_rate(RunConfig(lr=0.1))
        0.1
    """
    return run.spec.lr if run.lr is None else run.lr


def schedule(run: RunConfig) -> optax.Schedule:
    """Linear warmup to the peak, then constant, linear or cosine decay to 10% at ``steps``.

    Update ``s`` (counting from 0) of the warmup uses ``peak * (s + 1) / warmup_steps``.

    Example:
        >>> [float(schedule(RunConfig(lr=1.0, warmup_steps=4, schedule="constant"))(s))
        ...  for s in (0, 3, 9)]
        [0.25, 1.0, 1.0]
    """
    peak = learning_rate(run)
    warmup = min(run.warmup_steps, run.steps)
    decay_steps = max(run.steps - warmup, 1)
    if run.schedule == "constant":
        after = optax.constant_schedule(peak)
    elif run.schedule == "linear":
        after = optax.linear_schedule(peak, 0.1 * peak, decay_steps)
    else:
        after = optax.cosine_decay_schedule(peak, decay_steps, alpha=0.1)

    def lr(step: jax.Array) -> jax.Array:
        warm = peak * jnp.minimum((step + 1) / max(warmup, 1), 1.0)
        return jnp.where(step < warmup, warm, after(jnp.maximum(step - warmup, 0)))

    return lr


def optimizer(run: RunConfig, lr: optax.ScalarOrSchedule) -> optax.GradientTransformation:
    """The run's optimizer (weight decay on kernels only, optional clipping and LoRA+).

    Example:
        >>> tx = optimizer(RunConfig(optimizer="sgd"), 0.1)
    """
    if run.lora_plus_ratio is not None and run.optimizer != "adamw":
        raise ValueError(f"lora_plus_ratio needs optimizer adamw, found {run.optimizer!r}")
    if run.optimizer == "sgd":
        return with_clipping(optax.sgd(lr), run.max_grad_norm)
    if run.optimizer == "adamw-8bit":
        tx = adamw_8bit(lr, weight_decay=run.weight_decay, mask=decay_mask)
        return with_clipping(tx, run.max_grad_norm)
    tx = adamw(
        lr,
        weight_decay=run.weight_decay,
        max_grad_norm=run.max_grad_norm,
        lora_plus_ratio=run.lora_plus_ratio,
    )
    return paged(tx) if run.optimizer == "paged-adamw" else tx


def init_params(run: RunConfig, peft: jpeft.Method, base: Params, cfg: LlamaConfig) -> Params:
    """The base params with the method's nodes (seeded by ``run.seed``).

    Example:
        >>> from jpeft.models import hf
        >>> run = RunConfig(method="lora")
        >>> cfg, base = hf.load_pretrained("assets/tiny-llama")
        >>> params = init_params(run, method(run), base, cfg)
        >>> type(params["layers"]["self_attn"]["q_proj"]["kernel"]).__name__
        'LoRAWeight'
    """
    return peft.init(jax.random.fold_in(jax.random.key(run.seed), 1), base, cfg)


def model(run: RunConfig, cfg: LlamaConfig) -> llama.Llama:
    """The Flax LLaMA the run trains (compute dtype, rematerialization and attention from ``run``).

    Example:
        >>> cfg = LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32,
        ...                   num_hidden_layers=2, num_attention_heads=2)
        >>> model(RunConfig(remat="full"), cfg).remat
        'full'
    """
    return llama.Llama(
        cfg,
        dtype=context.compute_dtype(run.compute_dtype),
        remat=run.remat,
        attention_impl=run.attention_impl,
    )


def create_state(run: RunConfig, trainable: Params, cfg: LlamaConfig) -> TrainState:
    """The step-0 :class:`TrainState` of the run, not yet placed on a mesh.

    Pure in ``trainable``: ``jax.eval_shape(lambda t: create_state(run, t, cfg), trainable)``
    gives the abstract state of a model too large to allocate here.

    Example:
        >>> cfg = LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32,
        ...                   num_hidden_layers=2, num_attention_heads=2)
        >>> params = jax.eval_shape(lambda: jpeft.LoRA(r=2).init(
        ...     jax.random.key(0), llama.init_params(jax.random.key(1), cfg), cfg))
        >>> state = jax.eval_shape(lambda t: create_state(RunConfig(), t, cfg),
        ...                        jpeft.split(params)[0])
        >>> moments = state.opt_state.inner_state[1][0].mu
        >>> moments["layers"]["self_attn"]["q_proj"]["kernel"].adapters[0].a.shape
        (2, 16, 2)
    """
    with jax.ensure_compile_time_eval():  # a constant, under eval_shape too
        # a raw uint32 key: typed key arrays cannot be placed on other processes' devices
        rng = np.asarray(jax.random.key_data(jax.random.key(run.seed)))
    # the schedule's value is an optimizer hyperparameter the step metrics report
    tx = optax.inject_hyperparams(lambda learning_rate: optimizer(run, learning_rate))
    return TrainState.create(
        apply_fn=model(run, cfg).apply,
        trainable=trainable,
        tx=tx(learning_rate=schedule(run)),
        rng=rng,
        grad_accum_steps=run.grad_accum,
    )


def train_state(
    run: RunConfig, params: Params, cfg: LlamaConfig, mesh: Mesh
) -> tuple[Any, TrainState, Params]:
    """``(jitted step, state, frozen)`` placed on ``mesh``, at step 0.

    Example:
        >>> from jpeft.models import hf
        >>> from jpeft.train.sharding import make_mesh
        >>> run = RunConfig(method="lora")
        >>> cfg, base = hf.load_pretrained("assets/tiny-llama")
        >>> params = init_params(run, method(run), base, cfg)
        >>> step, state, frozen = train_state(run, params, cfg, make_mesh())
        >>> int(state.step), count(state.trainable) == count(jpeft.split(params)[0])
        (0, True)
    """
    trainable, frozen = jpeft.split(params)
    if not jax.tree.leaves(trainable):
        raise ValueError(f"--method {run.method} left nothing trainable")
    if jax.process_count() > 1:  # only host values may be placed on other processes' devices
        trainable, frozen = jax.device_get((trainable, frozen))
    return sharded_train_step(mesh, create_state(run, trainable, cfg), frozen)


def count(tree: Any) -> int:
    """Number of scalars in the arrays of ``tree``.

    Example:
        >>> count({"a": jnp.zeros((2, 3)), "b": None})
        6
    """
    return sum(int(leaf.size) for leaf in jax.tree.leaves(tree))
