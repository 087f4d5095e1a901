"""A new PEFT method defined entirely in this file, with no edit anywhere else in jpeft.

A scaled identity adapter: each layer's MLP output ``h`` becomes ``(1 + s_l) h`` with
one trainable scale per layer. It trains with ``train_step`` and goes through
``save_hf_adapter`` / ``load_hf_adapter`` like the built-in methods.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax
import jax.numpy as jnp
import numpy as np
import optax

import jpeft
from jpeft.adapter_files import AdapterConfig, AdapterTensors
from jpeft.method import Method, register
from jpeft.models import llama
from jpeft.models.config import LlamaConfig
from jpeft.models.context import Context
from jpeft.models.pytree import Params
from jpeft.train import TrainState, train_step


@jpeft.node(trainable=("scale",))
class ScaledIdentity(jpeft.Node):
    """``scale [L]``: the MLP output of layer ``l`` is multiplied by ``1 + scale[l]``."""

    scale: jax.Array

    def adapter_output(self, h: jax.Array, ctx: Context, name: str) -> jax.Array:
        return h * (1 + self.scale).astype(h.dtype)


def _with_scale(params: Params, scale: jax.Array) -> Params:
    return {**params, "layers": {**params["layers"], "adapter_mlp": ScaledIdentity(scale)}}


@register
@dataclasses.dataclass(frozen=True)
class ScaledIdentityAdapter(Method):
    peft_type: ClassVar[str] = "TEST_SCALED_IDENTITY"

    def init(self, key: jax.Array, params: Params, cfg: LlamaConfig) -> Params:
        return _with_scale(params, jnp.zeros((cfg.num_hidden_layers,), jnp.float32))

    def adapter_config(self, cfg: LlamaConfig) -> dict:
        return {"peft_type": self.peft_type}

    def adapter_tensors(self, params: Params, cfg: LlamaConfig) -> dict:
        return {"scale": np.asarray(params["layers"]["adapter_mlp"].scale)}

    @classmethod
    def read_adapter(
        cls, config: AdapterConfig, tensors: AdapterTensors, params: Params, cfg: LlamaConfig
    ) -> tuple[ScaledIdentityAdapter, Params]:
        scale = tensors.take("scale", (cfg.num_hidden_layers,))
        return cls(), _with_scale(params, jnp.asarray(scale))


def test_toy_method_trains_saves_and_loads(params, cfg, batch, tmp_path):
    ids, mask = batch
    method = ScaledIdentityAdapter()
    trainable, frozen = jpeft.split(method.init(jax.random.key(0), params, cfg))
    state = TrainState.create(
        apply_fn=llama.Llama(cfg).apply, trainable=trainable, tx=optax.sgd(1.0)
    )
    data = {"input_ids": ids, "attention_mask": mask, "loss_mask": mask}
    step = jax.jit(train_step)
    losses = []
    for _ in range(3):
        state, metrics = step(state, frozen, data)
        losses.append(float(metrics["loss"]))
    assert losses[-1] < losses[0]
    trained = jpeft.combine(state.trainable, frozen)
    assert np.abs(np.asarray(trained["layers"]["adapter_mlp"].scale)).max() > 0

    jpeft.save_hf_adapter(tmp_path, method, trained, cfg)
    loaded_method, loaded = jpeft.load_hf_adapter(tmp_path, params, cfg)
    assert loaded_method == method
    np.testing.assert_array_equal(
        np.asarray(llama.forward(loaded, cfg, jnp.asarray(ids))),
        np.asarray(llama.forward(trained, cfg, jnp.asarray(ids))),
    )
