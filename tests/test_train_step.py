"""train_step: masked next-token loss, gradients of the trainable part only, accumulation."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import tiny_config

import jpeft
from jpeft.models import llama
from jpeft.models.linear import matmul
from jpeft.train import TrainState, eval_step, train_step
from jpeft.train.step import check_batch, token_loss

LR = 0.5
CFG = tiny_config()
MODEL = llama.Llama(CFG)
SGD = optax.sgd(LR)
# One jitted step shared by the tests (same static state fields -> one compilation each).
STEP = jax.jit(train_step, donate_argnums=0, static_argnames="accum")


@jpeft.node(trainable=("value",), static=("rate",))
class DropoutKernel(jpeft.Node):
    """A fully trained kernel whose input goes through dropout (exercises the step's RNG)."""

    value: jax.Array
    rate: float


@matmul.register(DropoutKernel)
def _dropout_matmul(w, x, ctx, name):
    rng = ctx.module_rng(name)
    if rng is not None:
        keep = jax.random.bernoulli(rng, 1.0 - w.rate, x.shape)
        x = jnp.where(keep, x / (1.0 - w.rate), 0.0).astype(x.dtype)
    return matmul(w.value, x, ctx, name)


def make_params(cfg, dropout: float = 0.0):
    """Base params with trainable norms and lm_head (and a dropout q_proj if asked)."""
    params = llama.init_params(jax.random.key(0), cfg)
    layers = params["layers"]
    layers["input_layernorm"]["scale"] = jpeft.Trained(layers["input_layernorm"]["scale"])
    params["norm"]["scale"] = jpeft.Trained(params["norm"]["scale"])
    params["lm_head"]["kernel"] = jpeft.Trained(params["lm_head"]["kernel"])
    if dropout:
        q = layers["self_attn"]["q_proj"]
        q["kernel"] = DropoutKernel(q["kernel"], dropout)
    return params


def make_batch(cfg, b: int = 4, t: int = 12, seed: int = 0) -> dict[str, jax.Array]:
    """Rows with different padding (so micro-batches hold different target counts)."""
    rs = np.random.RandomState(seed)
    ids = rs.randint(0, cfg.vocab_size, (b, t)).astype(np.int32)
    mask = np.ones((b, t), np.int32)
    for row, length in enumerate([t, t - 5, t - 2, 6][:b]):
        mask[row, length:] = 0
    loss_mask = mask.copy()
    loss_mask[:, :4] = 0  # the "prompt"
    return {"input_ids": ids, "attention_mask": mask, "loss_mask": loss_mask}


def reference_loss(params, cfg, batch):
    logits = llama.forward(params, cfg, batch["input_ids"], attention_mask=batch["attention_mask"])
    logp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32))
    picked = jnp.take_along_axis(logp, batch["input_ids"][:, 1:, None], axis=-1)[..., 0]
    w = (batch["loss_mask"][:, 1:] * batch["attention_mask"][:, 1:]).astype(jnp.float32)
    return -jnp.sum(picked * w) / jnp.sum(w)


@jax.jit
def reference_loss_and_grads(trainable, frozen, batch):
    return jax.value_and_grad(lambda t: reference_loss(jpeft.combine(t, frozen), CFG, batch))(
        trainable
    )


@pytest.fixture(scope="module")
def setup():
    trainable, frozen = jpeft.split(make_params(CFG))
    return trainable, frozen, make_batch(CFG)


def sgd_state(trainable, **kwargs) -> TrainState:
    """A fresh SGD state on a copy of ``trainable`` (STEP donates its input state)."""
    copy = jax.tree.map(jnp.array, trainable)
    return TrainState.create(apply_fn=MODEL.apply, trainable=copy, tx=SGD, **kwargs)


def assert_trees_close(a, b, rtol=1e-5, atol=1e-6):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol, atol=atol)


def test_loss_and_update_match_a_plain_reference(setup):
    trainable, frozen, batch = setup
    ref_loss, ref_grads = reference_loss_and_grads(trainable, frozen, batch)
    new, metrics = STEP(sgd_state(trainable), frozen, batch)
    expected_tokens = int(np.sum(batch["loss_mask"][:, 1:] * batch["attention_mask"][:, 1:]))
    assert int(metrics["tokens"]) == expected_tokens
    np.testing.assert_allclose(float(metrics["loss"]), float(ref_loss), rtol=1e-6)
    np.testing.assert_allclose(
        float(metrics["grad_norm"]), float(optax.tree.norm(ref_grads)), rtol=1e-5
    )
    assert int(new.step) == 1
    assert_trees_close(new.trainable, jax.tree.map(lambda p, g: p - LR * g, trainable, ref_grads))
    assert jax.tree.structure(new.trainable) == jax.tree.structure(trainable)


def test_eval_loss_ignores_tokens_outside_the_loss_mask(setup):
    trainable, frozen, batch = setup
    state = sgd_state(trainable)
    step = jax.jit(eval_step)
    base = step(state, frozen, batch)
    changed = dict(batch, input_ids=batch["input_ids"].copy())
    changed["input_ids"][3, 6:] = 0  # padding of row 3
    other = step(state, frozen, changed)
    ref_loss, _ = reference_loss_and_grads(trainable, frozen, batch)
    np.testing.assert_allclose(float(base["loss"]), float(ref_loss), rtol=1e-6)
    assert float(base["loss"]) == float(other["loss"])
    assert int(base["tokens"]) == int(other["tokens"])


def test_segment_boundaries_are_not_targets():
    logits = jnp.zeros((1, 6, 5))
    ids = jnp.array([[1, 2, 3, 4, 1, 2]])
    ones = jnp.ones((1, 6), jnp.int32)
    segments = jnp.array([[1, 1, 1, 2, 2, 0]])
    _, count = token_loss(logits, ids, ones, ones, segments)
    assert int(count) == 3  # tokens 1, 2 (segment 1) and 4 (segment 2)


def test_gradient_accumulation_equals_the_full_batch(setup):
    trainable, frozen, batch = setup
    full, m_full = STEP(sgd_state(trainable), frozen, batch)
    acc, m_acc = STEP(sgd_state(trainable), frozen, batch, accum=2)
    np.testing.assert_allclose(float(m_acc["loss"]), float(m_full["loss"]), rtol=1e-6)
    np.testing.assert_allclose(float(m_acc["grad_norm"]), float(m_full["grad_norm"]), rtol=1e-5)
    assert int(m_acc["tokens"]) == int(m_full["tokens"])
    assert_trees_close(acc.trainable, full.trainable)


def test_bf16_compute_keeps_fp32_trainables_and_optimizer_state(setup):
    trainable, frozen, batch = setup
    model = llama.Llama(CFG, dtype=jnp.bfloat16)
    frozen16 = jax.tree.map(lambda x: x.astype(jnp.bfloat16), frozen)
    state = TrainState.create(apply_fn=model.apply, trainable=trainable, tx=optax.adam(1e-3))
    new, metrics = jax.jit(train_step)(state, frozen16, batch)
    for leaf in jax.tree.leaves((new.trainable, new.opt_state[0].mu, new.opt_state[0].nu)):
        assert leaf.dtype == jnp.float32
    ref_loss, _ = reference_loss_and_grads(trainable, frozen, batch)
    np.testing.assert_allclose(float(metrics["loss"]), float(ref_loss), rtol=2e-2)


def test_dropout_rng_is_functional_and_changes_per_step():
    trainable, frozen = jpeft.split(make_params(CFG, dropout=0.5))
    batch = make_batch(CFG)
    step = jax.jit(train_step)
    tx = optax.inject_hyperparams(optax.sgd)(learning_rate=optax.linear_schedule(1.0, 0.0, 10))
    state = TrainState.create(apply_fn=MODEL.apply, trainable=trainable, tx=tx, rng=3)
    second, first = step(state, frozen, batch)
    _, again = step(state, frozen, batch)
    assert float(first["loss"]) == float(again["loss"])  # same state: same masks
    _, later = step(state.replace(step=state.step + 1), frozen, batch)
    _, reseeded = step(state.replace(rng=jax.random.key(4)), frozen, batch)
    assert float(later["loss"]) != float(first["loss"])
    assert float(reseeded["loss"]) != float(first["loss"])
    assert float(first["learning_rate"]) == 1.0
    _, after_one_update = step(second, frozen, batch)
    np.testing.assert_allclose(float(after_one_update["learning_rate"]), 0.9, rtol=1e-6)


def test_non_finite_loss_leaves_the_state_unchanged(setup):
    trainable, frozen, batch = setup
    bad = dict(
        trainable, norm={"scale": jpeft.Trained(jnp.full((CFG.hidden_size,), jnp.nan, jnp.float32))}
    )
    before = jax.tree.map(np.asarray, bad)
    new, metrics = STEP(sgd_state(bad), frozen, batch)
    assert not np.isfinite(float(metrics["loss"]))
    assert int(new.step) == 0
    for x, y in zip(jax.tree.leaves(new.trainable), jax.tree.leaves(before), strict=True):
        np.testing.assert_array_equal(np.asarray(x), y)


def test_bad_batches_get_clear_errors(setup):
    _, _, batch = setup
    with pytest.raises(ValueError, match="missing"):
        check_batch({"input_ids": batch["input_ids"]})
    with pytest.raises(ValueError, match="unknown keys"):
        check_batch({**batch, "label": batch["input_ids"]})
    with pytest.raises(ValueError, match="loss_mask"):
        check_batch({**batch, "loss_mask": batch["loss_mask"][:, :-1]})
    with pytest.raises(ValueError, match="not a multiple"):
        check_batch(batch, accum=3)
    with pytest.raises(ValueError, match="grad_accum_steps"):
        sgd_state({"w": jnp.ones(2)}, grad_accum_steps=0)
