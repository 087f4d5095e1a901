"""Optimizer groups: weight-decay masks by node type and role, LoRA+, clipping."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import tiny_config

import jpeft
from jpeft.adapters.bottleneck import BottleneckAdapter
from jpeft.models import llama
from jpeft.optim.adamw8bit import adamw_8bit
from jpeft.optim.groups import (
    adamw,
    decay_mask,
    lora_plus,
    lora_plus_labels,
    scale_schedule,
    with_clipping,
)
from jpeft.prompts import encoders
from jpeft.prompts.nodes import PromptEncoder, SoftPrompt

CFG = tiny_config()


@pytest.fixture(scope="module")
def trainable():
    """DoRA on q/v, trainable norms, lm_head and embeddings, an adapter and two prompts."""
    params = llama.init_params(jax.random.key(0), CFG)
    params = jpeft.LoRA(r=4, alpha=8, targets=("q_proj", "v_proj"), use_dora=True).init(
        jax.random.key(1), params, CFG
    )
    params["norm"]["scale"] = jpeft.Trained(params["norm"]["scale"])
    params["lm_head"]["kernel"] = jpeft.Trained(params["lm_head"]["kernel"])
    params["embed_tokens"]["embedding"] = jpeft.Trained(params["embed_tokens"]["embedding"])
    h, n = CFG.hidden_size, CFG.num_hidden_layers
    params["layers"]["adapter_mlp"] = BottleneckAdapter(
        jnp.ones((n, h, 4)), jnp.ones((n, 4)), jnp.ones((n, 4, h)), jnp.ones((n, h)),
        jnp.ones((n,)), "relu", 1.0, True,
    )  # fmt: skip
    params["prompt"] = SoftPrompt(jnp.ones((3, h)))
    params["prompt_encoder"] = PromptEncoder(
        jnp.ones((3, h)), encoders.init_mlp(jax.random.key(2), h, 8), "MLP", 0.0
    )
    return jpeft.split(params)[0]


def adapter(tree, module="q_proj"):
    return tree["layers"]["self_attn"][module]["kernel"].adapters[0]


def test_decay_mask_follows_node_types_and_roles(trainable):
    mask = decay_mask(trainable)
    assert jax.tree.structure(mask) == jax.tree.structure(trainable)
    lora = adapter(mask)
    assert (lora.a, lora.b, lora.magnitude) == (True, True, False)
    assert mask["norm"]["scale"].value is False
    assert mask["lm_head"]["kernel"].value is True
    assert mask["embed_tokens"]["embedding"].value is False
    ad = mask["layers"]["adapter_mlp"]
    assert (ad.down, ad.up, ad.down_bias, ad.up_bias) == (True, True, False, False)
    assert mask["prompt"].embedding is False
    enc = mask["prompt_encoder"]
    assert enc.embedding is False
    assert enc.encoder["input"]["kernel"] is True
    assert enc.encoder["input"]["bias"] is False


def test_adamw_decays_only_masked_leaves(trainable):
    tx = optax.adamw(0.1, weight_decay=0.5, mask=decay_mask)
    zeros = jax.tree.map(jnp.zeros_like, trainable)
    updates, _ = tx.update(zeros, tx.init(trainable), trainable)
    new = optax.apply_updates(trainable, updates)
    assert np.allclose(adapter(new).a, adapter(trainable).a * 0.95)
    assert np.array_equal(adapter(new).magnitude, adapter(trainable).magnitude)
    assert np.array_equal(new["norm"]["scale"].value, trainable["norm"]["scale"].value)
    assert np.array_equal(new["prompt"].embedding, trainable["prompt"].embedding)


def test_lora_plus_scales_the_learning_rate_of_b(trainable):
    labels = lora_plus_labels(trainable)
    assert adapter(labels).b == "lora_b"
    assert adapter(labels).a == "default"
    assert labels["norm"]["scale"].value == "default"
    tx = lora_plus(optax.sgd, 0.1, ratio=4.0)
    ones = jax.tree.map(jnp.ones_like, trainable)
    updates, _ = jax.jit(tx.update)(ones, tx.init(trainable), trainable)
    np.testing.assert_allclose(adapter(updates).b, -0.4, rtol=1e-6)
    np.testing.assert_allclose(adapter(updates).a, -0.1, rtol=1e-6)
    np.testing.assert_allclose(updates["norm"]["scale"].value, -0.1, rtol=1e-6)
    schedule = scale_schedule(optax.linear_schedule(1.0, 0.0, 10), 4.0)
    assert float(schedule(5)) == 2.0


def test_clipping_bounds_the_global_norm(trainable):
    tx = with_clipping(optax.sgd(1.0), 1.0)
    grads = jax.tree.map(lambda x: jnp.full_like(x, 10.0), trainable)
    updates, _ = tx.update(grads, tx.init(trainable), trainable)
    np.testing.assert_allclose(float(optax.tree.norm(updates)), 1.0, rtol=1e-5)
    assert with_clipping(optax.sgd(1.0), None) is not None


def test_adamw_helper_composes_everything(trainable):
    tx = adamw(1e-2, weight_decay=0.1, max_grad_norm=1.0, lora_plus_ratio=16.0)
    state = tx.init(trainable)
    grads = jax.tree.map(jnp.ones_like, trainable)
    updates, _ = jax.jit(tx.update)(grads, state, trainable)
    # Adam's first step is lr * sign(g) (+ decay): B moves 16x further than A.
    b_step = np.abs(adapter(updates).b).max()
    a_step = np.abs(adapter(updates).a - (-0.1 * 1e-2 * adapter(trainable).a)).max()
    np.testing.assert_allclose(b_step, 16 * 1e-2, rtol=1e-3)
    np.testing.assert_allclose(a_step, 1e-2, rtol=1e-3)


def test_adamw_helper_takes_the_8bit_optimizer(trainable):
    tx = adamw(1e-2, weight_decay=0.1, lora_plus_ratio=16.0, base=adamw_8bit)
    grads = jax.tree.map(jnp.ones_like, trainable)
    updates, _ = jax.jit(tx.update)(grads, tx.init(trainable), trainable)
    np.testing.assert_allclose(np.abs(adapter(updates).b).max(), 16 * 1e-2, rtol=1e-3)
    np.testing.assert_allclose(updates["norm"]["scale"].value, -1e-2, rtol=1e-4)  # no decay


def test_bad_options_are_rejected():
    with pytest.raises(ValueError, match="ratio"):
        lora_plus(optax.sgd, 0.1, ratio=0.0)
    with pytest.raises(ValueError, match="max_grad_norm"):
        with_clipping(optax.sgd(0.1), -1.0)
