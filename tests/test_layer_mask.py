"""One way to say "this layer has no adapter": a full layer axis and a frozen layer mask.

LLaMA-Adapter adapts only the top layers, yet the forward pass (and its gradient) is
one scan over all layers that never slices or copies the frozen stacked base weights.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import sgd_train, tiny_config
from jax.extend.core import Var

import jpeft
from jpeft.adapters import Adapter, LlamaAdapter
from jpeft.models import llama
from jpeft.nodes import masked_layers

CFG = tiny_config(num_hidden_layers=3)
IDS = jnp.asarray(np.random.RandomState(0).randint(0, CFG.vocab_size, (2, 7)), jnp.int32)


def _layer_vars(jaxpr, tree, prefix_leaves: int = 0):
    """The jaxpr input variables that hold the stacked base layer weights of ``tree``."""
    paths = [path for path, _ in jax.tree_util.tree_leaves_with_path(tree)]
    layer = [prefix_leaves + i for i, path in enumerate(paths) if path[0].key == "layers"]
    return {jaxpr.invars[i] for i in layer}


def _consumers(jaxpr, variables):
    """Names of the primitives that read any of ``variables`` at the top level."""
    return [
        eqn.primitive.name
        for eqn in jaxpr.eqns
        if any(isinstance(v, Var) and v in variables for v in eqn.invars)
    ]


@pytest.fixture(scope="module")
def adapted():
    params = llama.init_params(jax.random.key(0), CFG)
    return LlamaAdapter(adapter_len=3, adapter_layers=2).init(jax.random.key(1), params, CFG)


def test_llama_adapter_is_one_scan_that_never_slices_the_base(adapted):
    closed = jax.make_jaxpr(lambda p: llama.forward(p, CFG, IDS))(adapted)
    base = _layer_vars(closed.jaxpr, adapted)
    assert base and _consumers(closed.jaxpr, base) == ["scan"]
    assert [e.primitive.name for e in closed.jaxpr.eqns].count("scan") == 1

    trainable, frozen = jpeft.split(adapted)
    loss = lambda t, f: jnp.mean(llama.forward(jpeft.combine(t, f), CFG, IDS))
    closed = jax.make_jaxpr(jax.grad(loss))(trainable, frozen)
    base = _layer_vars(closed.jaxpr, frozen, len(jax.tree.leaves(trainable)))
    assert base and set(_consumers(closed.jaxpr, base)) == {"scan"}  # forward and backward


def test_llama_adapter_masked_layers_never_move(adapted):
    adaption = adapted["adaption"]
    assert masked_layers(adaption.layer_mask) == (1, 2)
    gate = jnp.ones_like(adaption.gate)
    opened = {**adapted, "adaption": dataclasses.replace(adaption, gate=gate)}
    trained, losses = sgd_train(opened, CFG, IDS, steps=3, lr=1.0)
    assert losses[-1] < losses[0]
    moved = np.abs(np.asarray(trained["adaption"].prompt - opened["adaption"].prompt))
    assert moved[0].max() == 0 and moved[1:].max() > 0


def test_every_method_masks_layers_the_same_way():
    params = llama.init_params(jax.random.key(0), CFG)
    lora = jpeft.LoRA(r=2, targets=("q_proj",), layers_to_transform=(0, 2))
    q = lora.init(jax.random.key(1), params, CFG)["layers"]["self_attn"]["q_proj"]["kernel"]
    bottleneck = Adapter(bottleneck=4, placement="pfeiffer", layers=(0, 2))
    mlp = bottleneck.init(jax.random.key(1), params, CFG)["layers"]["adapter_mlp"]
    assert masked_layers(q.adapters[0].layer_mask) == masked_layers(mlp.layer_mask) == (0, 2)
