"""Host-offloaded ("paged") optimizer state: placement, streaming, the train step and the CLI.

CPU devices have a ``pinned_host`` memory, so these tests take the path a GPU takes: the
state is stored with that memory kind, jit sees host-memory buffers, and the step's
finite-guard has to choose between old and new state in device memory.
"""

from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from cli_utils import FAST, assert_same_adapter, reference_run, run_main, train_losses
from conftest import tiny_config

import jpeft
from jpeft.models import llama
from jpeft.optim import adamw, adamw_8bit, conditional_update, host_offload_supported, paged
from jpeft.train import TrainState, train_step
from jpeft.train.sharding import make_mesh, shard_batch, sharded_train_step

CFG = tiny_config()


def _memory_kinds(tree) -> set[str]:
    return {leaf.sharding.memory_kind for leaf in jax.tree.leaves(tree)}


def test_cpu_devices_have_pinned_host_memory_and_paged_offloads():
    kinds = {memory.kind for memory in jax.devices()[0].addressable_memories()}
    assert {"device", "pinned_host"} <= kinds
    assert host_offload_supported()
    tx = adamw_8bit(1e-3)
    assert paged(tx, offload=False) is tx
    assert _memory_kinds(paged(tx).init({"w": jnp.ones((64, 64))})) == {"pinned_host"}


def test_offloaded_state_matches_plain_optimizer_exactly():
    k_w, k_b = jax.random.split(jax.random.key(0))
    params = {"w": jax.random.normal(k_w, (64, 96)), "b": jax.random.normal(k_b, (96,))}
    plain, offloaded = adamw_8bit(1e-2), paged(adamw_8bit(1e-2))
    state_plain, state_off = plain.init(params), offloaded.init(params)
    assert _memory_kinds(state_off) == {"pinned_host"}
    update_plain = jax.jit(plain.update)
    # Donating host-resident state needs explicit in/out shardings (see `paged`).
    param_shardings = jax.tree.map(lambda x: x.sharding, params)
    state_shardings = jax.tree.map(lambda x: x.sharding, state_off)
    update_off = jax.jit(
        offloaded.update,
        donate_argnums=1,
        in_shardings=(param_shardings, state_shardings, param_shardings),
        out_shardings=(param_shardings, state_shardings),
    )
    params_plain = params_off = params
    for step in range(3):
        grads = jax.tree.map(lambda p, s=step: jnp.sin(p * (s + 1)), params_plain)
        u_plain, state_plain = update_plain(grads, state_plain, params_plain)
        donated = state_off
        u_off, state_off = update_off(grads, state_off, params_off)
        assert all(leaf.is_deleted() for leaf in jax.tree.leaves(donated))
        assert _memory_kinds(state_off) == {"pinned_host"}
        assert _memory_kinds(u_off) == {"device"}
        params_plain = optax.apply_updates(params_plain, u_plain)
        params_off = optax.apply_updates(params_off, u_off)
    for a, b in zip(
        jax.tree.leaves((params_plain, state_plain)),
        jax.tree.leaves((params_off, state_off)),
        strict=True,
    ):
        np.testing.assert_array_equal(a, b)


@pytest.fixture(scope="module")
def lora():
    params = llama.init_params(jax.random.key(0), CFG)
    params = jpeft.LoRA(r=4, alpha=8, targets=("q_proj", "v_proj")).init(
        jax.random.key(1), params, CFG
    )
    params["norm"]["scale"] = jpeft.Trained(params["norm"]["scale"])
    return jpeft.split(params)


@pytest.mark.parametrize(
    "make",
    [
        lambda: adamw(1e-2, weight_decay=0.1, max_grad_norm=1.0, lora_plus_ratio=4.0),
        lambda: adamw_8bit(1e-2, min_8bit_size=64),
    ],
    ids=["adamw-lora-plus-clipped", "adamw-8bit"],
)
def test_streamed_conditional_update_equals_the_plain_update(lora, make):
    trainable, _ = lora
    plain, offloaded = make(), paged(make())
    grads = jax.tree.map(lambda x: jnp.cos(x * 3.0) + 0.5, trainable)
    update = jax.jit(conditional_update, static_argnums=0)
    for apply in (True, False):
        state_plain, state_off = plain.init(trainable), offloaded.init(trainable)
        u_plain, new_plain = update(plain, jnp.bool_(apply), grads, state_plain, trainable)
        u_off, new_off = update(offloaded, jnp.bool_(apply), grads, state_off, trainable)
        assert _memory_kinds(new_off) == {"pinned_host"}
        expected = new_plain if apply else state_plain
        # one update per parameter: XLA may fuse (and round) each run differently, by an ulp
        pairs = zip(
            jax.tree.leaves((u_plain, expected)), jax.tree.leaves((u_off, new_off)), strict=True
        )
        for a, b in pairs:
            np.testing.assert_allclose(a, b, rtol=1e-6, atol=0)


def test_sharded_train_step_keeps_paged_state_in_host_memory(lora):
    """Steps through sharded_train_step (the CLI path) equal the un-paged optimizer's.

    The first step's loss and gradient norm exactly; the state to rounding: each streamed
    run of the update is fused on its own.
    """
    trainable, frozen = lora
    model = llama.Llama(CFG)
    mesh = make_mesh()
    ids = np.random.RandomState(0).randint(0, CFG.vocab_size, (4, 12)).astype(np.int32)
    batch = shard_batch({"input_ids": ids, "attention_mask": ids * 0 + 1, "loss_mask": ids}, mesh)

    def run(tx: optax.GradientTransformation, steps: int = 2):
        copy = jax.tree.map(jnp.array, trainable)  # the step donates the state
        state = TrainState.create(apply_fn=model.apply, trainable=copy, tx=tx, rng=1)
        step, state, placed = sharded_train_step(mesh, state, frozen)
        metrics = []
        for _ in range(steps):
            state, step_metrics = step(state, placed, batch)
            metrics.append(step_metrics)
        return state, metrics

    plain, plain_metrics = run(adamw(1e-2, weight_decay=0.1, max_grad_norm=1.0))
    offloaded, metrics = run(paged(adamw(1e-2, weight_decay=0.1, max_grad_norm=1.0)))
    # the first step's gradients are the same (built in host memory, not device memory)
    for key in ("loss", "grad_norm"):
        np.testing.assert_array_equal(metrics[0][key], plain_metrics[0][key])
    metrics, plain_metrics = metrics[-1], plain_metrics[-1]
    assert _memory_kinds(offloaded.opt_state) == {"pinned_host"}
    assert _memory_kinds(offloaded.trainable) == {"device"}
    np.testing.assert_allclose(metrics["loss"], plain_metrics["loss"], rtol=1e-6)
    assert int(offloaded.step) == 2
    for a, b in zip(
        jax.tree.leaves((plain.trainable, plain.opt_state)),
        jax.tree.leaves((offloaded.trainable, offloaded.opt_state)),
        strict=True,
    ):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


def _host_scan_outputs(jaxpr: jax.extend.core.Jaxpr) -> int:
    """How many outputs of the scans in ``jaxpr`` (nested ones included) are in host memory."""
    count = 0
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "scan":
            host = [v for v in eqn.outvars if v.aval.memory_space == jax.memory.Space.Host]
            count += len(host)
        for param in eqn.params.values():
            inner = getattr(param, "jaxpr", param)
            if isinstance(inner, jax.extend.core.Jaxpr):
                count += _host_scan_outputs(inner)
    return count


def test_paged_step_builds_the_layer_gradients_in_host_memory(lora):
    """With paged state the backward scan writes each layer's gradient to host memory, with
    and without micro-batches (the values are the same: see the sharded test above)."""
    trainable, frozen = lora
    model = llama.Llama(CFG)
    ids = np.ones((4, 12), np.int32)
    batch = {"input_ids": ids, "attention_mask": ids, "loss_mask": ids}
    layers = len(jax.tree.leaves(trainable["layers"]))
    for tx, host_outputs in ((adamw(1e-2), 0), (paged(adamw(1e-2)), layers)):
        for accum in (1, 2):
            state = TrainState.create(
                apply_fn=model.apply, trainable=trainable, tx=tx, grad_accum_steps=accum
            )
            # the gradient of each stacked layer leaf is an output of the backward scan
            jaxpr = jax.make_jaxpr(train_step)(state, frozen, batch).jaxpr
            assert _host_scan_outputs(jaxpr) == host_outputs, (tx, accum)


def test_a_skipped_step_keeps_paged_state_unchanged(lora):
    trainable, frozen = lora
    broken = jax.tree.map(lambda x: jnp.full_like(x, jnp.nan), trainable)
    tx = paged(adamw(1e-2))
    state = TrainState.create(apply_fn=llama.Llama(CFG).apply, trainable=broken, tx=tx)
    frozen = jax.tree.map(jnp.array, frozen)
    before = jax.tree.map(np.asarray, state.opt_state)
    ids = np.ones((2, 8), np.int32)
    step = jax.jit(train_step, donate_argnums=0)
    state, metrics = step(
        state, frozen, {"input_ids": ids, "attention_mask": ids, "loss_mask": ids}
    )
    assert not np.isfinite(float(metrics["loss"])) and int(state.step) == 0
    assert _memory_kinds(state.opt_state) == {"pinned_host"}
    for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(state.opt_state), strict=True):
        np.testing.assert_array_equal(a, b)


def test_cli_paged_adamw_equals_adamw(tmp_path):
    """``--optimizer paged-adamw`` trains like adamw, and its checkpoint restores."""
    _, reference = reference_run()
    out = tmp_path / "paged"
    args = [*FAST, "--eval-samples", "0", "--optimizer", "paged-adamw", "--output-dir", str(out)]
    code, _, stderr = run_main("train", *args)
    assert code == 0, stderr
    losses, expected = train_losses(out), train_losses(reference)
    assert losses.keys() == expected.keys()
    # to rounding (see above), which Adam amplifies where a gradient is near zero
    np.testing.assert_allclose(list(losses.values()), list(expected.values()), rtol=1e-5)
    assert_same_adapter(out, reference, rtol=0, atol=1e-4)
    code, stdout, stderr = run_main(
        "generate", "--run", str(out), "--prompt", "Hello", "--max-new-tokens", "2"
    )
    assert code == 0 and "\nHello\n-> " in stdout, stderr


def test_extra_args_pass_through():
    params = {"w": jnp.ones((4,))}
    tx = paged(optax.adam(1e-3))
    updates, _ = tx.update(params, tx.init(params), params, value=jnp.float32(1.0))
    assert updates["w"].shape == (4,)


def test_forced_offload_without_pinned_host_raises(monkeypatch):
    fake = SimpleNamespace(platform="gpu", addressable_memories=lambda: [])
    monkeypatch.setattr(jax, "devices", lambda: [fake])
    with pytest.raises(ValueError, match="offload"):
        paged(optax.adam(1e-3), offload=True)
