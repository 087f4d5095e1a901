"""Logical axes -> mesh shardings, and a sharded step on 8 CPU devices equal to 1 device.

The 8-device check runs this file as a script in a subprocess (with
``--xla_force_host_platform_device_count=8``) so the rest of the suite keeps 1 device.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import run_on_cpu_devices
from jax.sharding import AbstractMesh
from jax.sharding import PartitionSpec as P

import jpeft
from jpeft.models import llama
from jpeft.models.config import LlamaConfig
from jpeft.sharding import is_axes, logical_axes
from jpeft.train import TrainState, train_step
from jpeft.train.sharding import (
    parse_mesh,
    partition_spec,
    shard_batch,
    sharded_train_step,
    state_shardings,
    tree_shardings,
)

CFG = LlamaConfig(
    vocab_size=97,  # not divisible by 2: the vocab axis falls back to replicated
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
)
MESH = AbstractMesh((2, 2, 2), ("data", "fsdp", "tensor"))


def lora_params():
    params = llama.init_params(jax.random.key(0), CFG)
    params = jpeft.LoRA(r=4, alpha=8, targets=("q_proj", "v_proj")).init(
        jax.random.key(1), params, CFG
    )
    params["norm"]["scale"] = jpeft.Trained(params["norm"]["scale"])
    return params


def test_logical_axes_of_base_params_and_lora_nodes():
    params = lora_params()
    axes = logical_axes(params)
    assert axes["embed_tokens"]["embedding"] == ("vocab", "embed")
    assert axes["layers"]["mlp"]["down_proj"]["kernel"] == ("layers", "mlp", "embed")
    assert axes["layers"]["input_layernorm"]["scale"] == ("layers", "norm")
    q = axes["layers"]["self_attn"]["q_proj"]["kernel"]
    assert q.base == ("layers", "embed", "heads")
    assert q.adapters[0].a == ("layers", "embed", None)
    assert q.adapters[0].b == ("layers", None, "heads")
    trainable, frozen = jpeft.split(params)
    for part in (trainable, frozen):  # each part's axes mirror its structure exactly
        paths = [p for p, _ in jax.tree_util.tree_leaves_with_path(part)]
        axes_paths = jax.tree_util.tree_leaves_with_path(logical_axes(part), is_leaf=is_axes)
        assert [p for p, _ in axes_paths] == paths


def test_partition_specs_follow_the_rules():
    assert partition_spec(("layers", "embed", "heads"), (2, 32, 32), MESH) == P(
        None, "fsdp", "tensor"
    )
    assert partition_spec(("vocab", "embed"), (97, 32), MESH) == P(None, "fsdp")  # 97 % 2
    assert partition_spec(("heads", "mlp"), (8, 8), MESH) == P("tensor", None)  # used once
    assert partition_spec(("batch", None), (8, 5), MESH) == P(("data", "fsdp"), None)
    assert partition_spec(("batch",), (6,), MESH) == P(None)


def test_optimizer_state_follows_the_trainable_layout():
    trainable, frozen = jpeft.split(lora_params())
    state = TrainState.create(apply_fn=None, trainable=trainable, tx=optax.adamw(1e-3))
    sh = state_shardings(state, MESH)
    a = sh.trainable["layers"]["self_attn"]["q_proj"]["kernel"].adapters[0].a
    mu_b = sh.opt_state[0].mu["layers"]["self_attn"]["v_proj"]["kernel"].adapters[0].b
    assert a.spec == P(None, "fsdp", None)
    assert mu_b.spec == P(None, None, "tensor")
    assert sh.opt_state[0].count.spec == P() and sh.step.spec == P()
    frozen_sh = tree_shardings(frozen, MESH)
    assert frozen_sh["layers"]["mlp"]["up_proj"]["kernel"].spec == P(None, "fsdp", "tensor")


def test_mesh_specs_are_validated():
    assert parse_mesh("data=2,fsdp=2,tensor=2", 8) == {"data": 2, "fsdp": 2, "tensor": 2}
    assert parse_mesh("tensor=2,data=-1", 8) == {"data": 4, "fsdp": 1, "tensor": 2}
    with pytest.raises(ValueError, match="unknown"):
        parse_mesh("model=2", 2)
    with pytest.raises(ValueError, match="but 8 are available"):
        parse_mesh("data=2", 8)
    with pytest.raises(ValueError, match="axis=size"):
        parse_mesh("data:2", 2)


def test_sharded_step_on_8_devices_equals_1_device():
    assert "sharded == unsharded" in run_on_cpu_devices(__file__)


def _compare_on_8_devices() -> None:
    """Two AdamW steps, plain jit on one device vs the 2x2x2 mesh (with accumulation)."""
    from jpeft.train.sharding import make_mesh

    assert jax.device_count() == 8, jax.devices()
    trainable, frozen = jpeft.split(lora_params())
    model = llama.Llama(CFG)
    tx = optax.adamw(1e-2, weight_decay=0.01)
    rs = np.random.RandomState(0)
    ids = rs.randint(0, CFG.vocab_size, (8, 12)).astype(np.int32)
    mask = np.ones_like(ids)
    mask[3, 7:] = 0
    batch = {"input_ids": ids, "attention_mask": mask, "loss_mask": mask}

    def fresh() -> TrainState:
        copy = jax.tree.map(jnp.array, trainable)
        return TrainState.create(apply_fn=model.apply, trainable=copy, tx=tx, rng=1)

    plain, plain_frozen = fresh(), frozen
    step = jax.jit(train_step)
    mesh = make_mesh("data=2,fsdp=2,tensor=2")
    sharded_step, sharded, sharded_frozen = sharded_train_step(mesh, fresh(), frozen, accum=2)
    q = sharded_frozen["layers"]["self_attn"]["q_proj"]["kernel"].base
    assert q.sharding.spec == P(None, "fsdp", "tensor"), q.sharding
    for _ in range(2):
        plain, m_plain = step(plain, plain_frozen, batch)
        sharded, m_sharded = sharded_step(sharded, sharded_frozen, shard_batch(batch, mesh))
        for key in ("loss", "grad_norm", "tokens"):
            np.testing.assert_allclose(float(m_sharded[key]), float(m_plain[key]), rtol=2e-5)
    b = sharded.trainable["layers"]["self_attn"]["q_proj"]["kernel"].adapters[0].b
    assert b.sharding.spec == P(None, None, "tensor"), b.sharding
    for x, y in zip(
        jax.tree.leaves(sharded.trainable), jax.tree.leaves(plain.trainable), strict=True
    ):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-4, atol=1e-6)
    print("sharded == unsharded")


if __name__ == "__main__":
    _compare_on_8_devices()
