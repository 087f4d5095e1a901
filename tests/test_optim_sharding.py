"""Optimizer state shards like its params (fp32, 8-bit and host-offloaded), on 8 CPU devices.

The checks run this file as a script in a subprocess with 8 devices (as test_sharding.py
does), so the rest of the suite keeps 1 device.
"""

from __future__ import annotations

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import run_on_cpu_devices, tiny_config
from jax.sharding import AbstractMesh
from jax.sharding import PartitionSpec as P

import jpeft
from jpeft.models import llama
from jpeft.optim import QuantizedMoment, adamw, adamw_8bit, paged
from jpeft.optim.adamw8bit import init_moment
from jpeft.optim.state_map import map_params
from jpeft.train import TrainState
from jpeft.train.sharding import state_shardings

CFG = tiny_config(vocab_size=128, hidden_size=64, intermediate_size=128)
MESHES = ("data=8", "fsdp=8", "tensor=8", "data=2,fsdp=2,tensor=2")
# Blocks of 4 fill every shard of these tiny tensors on 8 devices; min_8bit_size 0: all 8-bit.
OPTIMIZERS = {
    "adamw": lambda: adamw(1e-2, weight_decay=0.1, max_grad_norm=1.0, lora_plus_ratio=4.0),
    "adamw-8bit": lambda: adamw_8bit(1e-2, blocksize=4, min_8bit_size=0),
    "paged-adamw-8bit": lambda: paged(adamw_8bit(1e-2, blocksize=4, min_8bit_size=0)),
}


def lora_split():
    params = llama.init_params(jax.random.key(0), CFG)
    params = jpeft.LoRA(r=8, alpha=16, targets=("q_proj", "v_proj", "up_proj")).init(
        jax.random.key(1), params, CFG
    )
    params["norm"]["scale"] = jpeft.Trained(params["norm"]["scale"])
    return jpeft.split(params)


def _spec(sharding, ndim: int) -> tuple:
    return (*tuple(sharding.spec), *(None,) * (ndim - len(sharding.spec)))


def _shardings(tree):
    return jax.tree.map(lambda x: getattr(x, "sharding", x), tree)


def assert_state_follows_params(tx, opt_shardings, trainable, param_shardings, host) -> int:
    """Every per-parameter entry of ``opt_shardings`` follows its param's sharding.

    Returns the number of sharded parameters checked.
    """
    sharded = []
    kinds = {"pinned_host"} if host else {None, "device"}

    def check(entry, param, param_sharding):
        ndim = len(np.shape(param))
        want = _spec(param_sharding, ndim)
        sharded.append(any(want))
        if isinstance(entry, optax.MaskedNode):
            return None
        if isinstance(entry, QuantizedMoment):  # of shardings: the layout from the param
            layout = init_moment(param, entry.layer_dims, entry.blocksize)
            aligned, rest = layout.aligned_dims, layout.absmax.ndim - layout.aligned_dims
            assert _spec(entry.codes, ndim) == want
            # here every absmax dim divides by its mesh axes
            assert _spec(entry.absmax, aligned + rest) == (*want[:aligned], *(None,) * rest)
            assert {entry.codes.memory_kind, entry.absmax.memory_kind} <= kinds
            return None
        assert _spec(entry, ndim) == want
        assert entry.memory_kind in kinds
        return None

    map_params(tx, check, opt_shardings, trainable, param_shardings, non_params=lambda s: None)
    return sum(sharded)


def _check_on_8_devices() -> None:
    from jpeft.train.sharding import make_mesh, shard_batch, sharded_train_step, tree_shardings

    assert jax.device_count() == 8, jax.devices()
    trainable, frozen = lora_split()
    model = llama.Llama(CFG)
    rs = np.random.RandomState(0)
    ids = rs.randint(0, CFG.vocab_size, (8, 12)).astype(np.int32)
    batch = {"input_ids": ids, "attention_mask": np.ones_like(ids), "loss_mask": ids}
    for spec in MESHES:
        mesh = make_mesh(spec)
        for name, make in OPTIMIZERS.items():
            tx = make()
            state = TrainState.create(apply_fn=model.apply, trainable=trainable, tx=tx)
            with warnings.catch_warnings():
                warnings.simplefilter("error")  # no entry falls back to replicated
                sh = state_shardings(state, mesh)
            host = name.startswith("paged")
            assert sh.trainable == tree_shardings(trainable, mesh)
            count = assert_state_follows_params(tx, sh.opt_state, trainable, sh.trainable, host)
            assert (count > 0) == (spec != "data=8"), (spec, name)  # data: replicated
    # The placed arrays after a step, too (test_sharding.py steps with fp32 AdamW).
    mesh = make_mesh("data=2,fsdp=2,tensor=2")
    copy = jax.tree.map(jnp.array, trainable)
    tx = OPTIMIZERS["paged-adamw-8bit"]()
    state = TrainState.create(apply_fn=model.apply, trainable=copy, tx=tx, rng=1)
    step, state, placed = sharded_train_step(mesh, state, frozen)
    state, metrics = step(state, placed, shard_batch(batch, mesh))
    assert np.isfinite(float(metrics["loss"]))
    opt_sh, params_sh = _shardings(state.opt_state), _shardings(state.trainable)
    assert_state_follows_params(tx, opt_sh, state.trainable, params_sh, host=True)
    a = state.opt_state[0].mu["layers"]["mlp"]["up_proj"]["kernel"].adapters[0].a
    assert a.codes.sharding.spec == P(None, "fsdp", None), a.codes.sharding
    assert a.absmax.sharding.spec == P(None, "fsdp", None), a.absmax.sharding
    print("optimizer state follows the params")


def test_optimizer_state_shards_like_params_on_8_devices():
    assert "optimizer state follows the params" in run_on_cpu_devices(__file__)


def test_8bit_absmax_that_cannot_follow_warns_naming_the_leaf():
    """Blocks of 256 span all 64 rows of up_proj's A ``[L, 64, 8]``: its absmax cannot shard."""
    trainable, _ = lora_split()
    tx = adamw_8bit(1e-2, min_8bit_size=0)
    state = TrainState.create(apply_fn=None, trainable=trainable, tx=tx)
    mesh = AbstractMesh((8,), ("fsdp",))
    with pytest.warns(UserWarning, match=r"up_proj.*adapters\[0\]\.a.*absmax.*fsdp"):
        sh = state_shardings(state, mesh)
    a = sh.opt_state[0].nu["layers"]["mlp"]["up_proj"]["kernel"].adapters[0].a
    assert a.codes.spec == P(None, "fsdp", None) and tuple(a.absmax.spec) == (None, None)


def test_state_of_unknown_layout_is_replicated_with_a_warning():
    trainable = {"lm_head": {"kernel": jnp.zeros((16, 8))}}  # ("embed", "vocab")
    tx = optax.adafactor(1e-2, min_dim_size_to_factor=4)  # factored rows and columns
    state = TrainState.create(apply_fn=None, trainable=trainable, tx=tx)
    mesh = AbstractMesh((8,), ("fsdp",))
    with pytest.warns(UserWarning, match=r"\['lm_head'\]\['kernel'\].*replicated"):
        sh = state_shardings(state, mesh)
    assert sh.trainable["lm_head"]["kernel"].spec == P("fsdp", None)


if __name__ == "__main__":
    _check_on_8_devices()
