"""The 4-bit kernels (interpret mode) in a QLoRA model under a 2x2x2 mesh of CPU devices:
two AdamW steps (scanned, rematerialised layers; every linear NF4+DQ) equal XLA's
dequantize-then-dot on one device, so the kernels' values and input gradients are right
under the layer scan and their per-shard calls are too.

Runs this file as a script in a subprocess with 8 host devices, as tests/test_sharding.py
does, so the rest of the suite keeps one device.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
from conftest import run_on_cpu_devices

import jpeft
from jpeft import quant
from jpeft.models import llama
from jpeft.models.config import LlamaConfig
from jpeft.train import TrainState, train_step

CFG = LlamaConfig(
    vocab_size=97,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
)


def test_sharded_kernels_on_8_devices_equal_xla_on_1_device():
    assert "sharded kernels == one-device XLA" in run_on_cpu_devices(__file__)


def _compare_on_8_devices() -> None:
    """Two AdamW steps of QLoRA: interpret-mode kernels on the mesh vs XLA on one device."""
    from jpeft.train.sharding import make_mesh, shard_batch, sharded_train_step

    assert jax.device_count() == 8, jax.devices()
    params = llama.init_params(jax.random.key(0), CFG)
    params = jpeft.QLoRA(r=4, targets="all-linear").init(jax.random.key(1), params, CFG)
    trainable, frozen = jpeft.split(params)
    model = llama.Llama(CFG)
    tx = optax.adamw(1e-2)
    ids = np.random.RandomState(0).randint(0, CFG.vocab_size, (8, 12)).astype(np.int32)
    batch = {"input_ids": ids, "attention_mask": np.ones_like(ids), "loss_mask": np.ones_like(ids)}

    def fresh() -> TrainState:
        copy = jax.tree.map(jnp.array, trainable)
        return TrainState.create(apply_fn=model.apply, trainable=copy, tx=tx, rng=1)

    plain, plain_frozen = fresh(), quant.with_implementation(frozen, "xla")
    step = jax.jit(train_step)
    mesh = make_mesh("data=2,fsdp=2,tensor=2")
    kernel_frozen = quant.with_implementation(frozen, "interpret")
    sharded_step, sharded, sharded_frozen = sharded_train_step(mesh, fresh(), kernel_frozen)
    packed = sharded_frozen["layers"]["mlp"]["up_proj"]["kernel"].base.packed
    assert packed.sharding.spec == jax.sharding.PartitionSpec(None, "tensor", "fsdp")
    for _ in range(2):
        plain, m_plain = step(plain, plain_frozen, batch)
        sharded, m_sharded = sharded_step(sharded, sharded_frozen, shard_batch(batch, mesh))
        for key in ("loss", "grad_norm"):
            np.testing.assert_allclose(float(m_sharded[key]), float(m_plain[key]), rtol=2e-5)
    for x, y in zip(
        jax.tree.leaves(sharded.trainable), jax.tree.leaves(plain.trainable), strict=True
    ):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-4, atol=1e-6)
    print("sharded kernels == one-device XLA")


if __name__ == "__main__":
    _compare_on_8_devices()
