"""Host-offloaded ("paged") optimizer state: placement and exact equality with the plain one."""

from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jpeft.optim import adamw_8bit, host_offload_supported, paged


def _memory_kinds(tree) -> set[str]:
    return {leaf.sharding.memory_kind for leaf in jax.tree.leaves(tree)}


def test_cpu_has_no_host_offload_and_paged_is_a_no_op():
    assert jax.default_backend() == "cpu"
    assert not host_offload_supported()
    tx = adamw_8bit(1e-3)
    assert paged(tx) is tx
    assert paged(tx, offload=False) is tx


def test_offloaded_state_matches_plain_optimizer_exactly():
    k_w, k_b = jax.random.split(jax.random.key(0))
    params = {"w": jax.random.normal(k_w, (64, 96)), "b": jax.random.normal(k_b, (96,))}
    plain, offloaded = adamw_8bit(1e-2), paged(adamw_8bit(1e-2), offload=True)
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


def test_extra_args_pass_through():
    params = {"w": jnp.ones((4,))}
    tx = paged(optax.adam(1e-3), offload=True)
    updates, _ = tx.update(params, tx.init(params), params, value=jnp.float32(1.0))
    assert updates["w"].shape == (4,)


def test_forced_offload_without_pinned_host_raises(monkeypatch):
    fake = SimpleNamespace(platform="gpu", addressable_memories=lambda: [])
    monkeypatch.setattr(jax, "devices", lambda: [fake])
    with pytest.raises(ValueError, match="offload"):
        paged(optax.adam(1e-3), offload=True)
