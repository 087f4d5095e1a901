"""Bottleneck adapters against a plain reference: transformers' LLaMA with forward hooks."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from conftest import hf_twin, sgd_train

import jpeft
from jpeft.adapters import Adapter
from jpeft.models import llama


def _randomize(params, key):
    """Give every adapter weight random values so the adapter is not a no-op."""
    layers = dict(params["layers"])
    for name in ("adapter_attn", "adapter_mlp"):
        if name in layers:
            node = layers[name]
            keys = jax.random.split(key, 4)
            fields = {
                f: 0.3 * jax.random.normal(k, getattr(node, f).shape)
                for f, k in zip(node.trainable_fields, keys, strict=True)
            }
            layers[name] = dataclasses.replace(node, **fields)
    return {**params, "layers": layers}


def _torch_reference(base, params, cfg, method, ids):
    """Logits of the HF twin of ``base`` with the adapters added by forward hooks."""
    model = hf_twin(base, cfg)
    act = {
        "relu": torch.relu,
        "gelu": torch.nn.functional.gelu,
        "silu": torch.nn.functional.silu,
        "tanh": torch.tanh,
    }[method.activation]
    modules = {"attn": "self_attn", "mlp": "mlp"}
    for position in method.positions:
        node = params["layers"][f"adapter_{position}"]
        for i, layer in enumerate(model.model.layers):
            if node.layer_mask[i].item() == 0:
                continue
            w = {f: torch.tensor(np.asarray(getattr(node, f)[i])) for f in node.trainable_fields}

            def hook(module, args, output, w=w):
                h = output[0] if isinstance(output, tuple) else output
                delta = method.scaling * (
                    act(h @ w["down"] + w["down_bias"]) @ w["up"] + w["up_bias"]
                )
                new = h + delta
                return (new, *output[1:]) if isinstance(output, tuple) else new

            getattr(layer, modules[position]).register_forward_hook(hook)
    return model(torch.tensor(ids)).logits.detach().numpy()


@pytest.mark.parametrize(
    "method",
    [
        Adapter(bottleneck=8),
        Adapter(reduction_factor=4, placement="pfeiffer", activation="gelu", scaling=0.5),
        Adapter(bottleneck=4, placement=("attn",), activation="silu", layers=(1,)),
    ],
)
def test_matches_plain_reference(params, cfg, batch, method):
    ids, _ = batch
    adapted = _randomize(method.init(jax.random.key(1), params, cfg), jax.random.key(2))
    out = np.asarray(llama.forward(adapted, cfg, jnp.asarray(ids)))
    ref = _torch_reference(params, adapted, cfg, method, ids)
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)


def test_starts_equal_to_base(params, cfg, batch):
    ids, mask = batch
    adapted = Adapter(bottleneck=8).init(jax.random.key(1), params, cfg)
    base = llama.forward(params, cfg, jnp.asarray(ids), attention_mask=jnp.asarray(mask))
    out = llama.forward(adapted, cfg, jnp.asarray(ids), attention_mask=jnp.asarray(mask))
    np.testing.assert_array_equal(np.asarray(out), np.asarray(base))


def test_training_changes_only_adapters_and_reduces_loss(params, cfg, batch):
    ids, _ = batch
    method = Adapter(bottleneck=8, layers=(0,))
    adapted = method.init(jax.random.key(1), params, cfg)
    trained, losses = sgd_train(adapted, cfg, jnp.asarray(ids), steps=15, lr=0.5)
    assert losses[-1] < losses[0] - 0.1
    _, frozen_before = jpeft.split(adapted)
    _, frozen_after = jpeft.split(trained)
    jax.tree.map(np.testing.assert_array_equal, frozen_after, frozen_before)
    up = trained["layers"]["adapter_mlp"].up
    assert np.abs(np.asarray(up[0])).max() > 0  # the adapted layer learned
    assert np.abs(np.asarray(up[1])).max() == 0  # the skipped layer never moves


def test_save_load_round_trip(params, cfg, batch, tmp_path):
    ids, _ = batch
    method = Adapter(bottleneck=8, placement="pfeiffer", layers=(1,))
    adapted = _randomize(method.init(jax.random.key(1), params, cfg), jax.random.key(2))
    jpeft.save_hf_adapter(tmp_path, method, adapted, cfg)
    loaded_method, loaded = jpeft.load_hf_adapter(tmp_path, params, cfg)
    assert loaded_method.positions == method.positions
    assert loaded_method.layers == method.layers
    np.testing.assert_array_equal(
        np.asarray(llama.forward(loaded, cfg, jnp.asarray(ids))),
        np.asarray(llama.forward(adapted, cfg, jnp.asarray(ids))),
    )


def test_merge_is_refused(params, cfg, tmp_path):
    from jpeft.models.hf_names import hf_state_dict

    adapted = Adapter(bottleneck=8).init(jax.random.key(1), params, cfg)
    with pytest.raises(ValueError, match="adapter_attn"):
        hf_state_dict(jpeft.merge(adapted), cfg)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(bottleneck=8, reduction_factor=2), "exactly one"),
        (dict(bottleneck=8, activation="swish"), "activation"),
        (dict(bottleneck=8, placement="middle"), "placement"),
        (dict(bottleneck=8, placement=("ffn",)), "placement"),
    ],
)
def test_bad_options(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Adapter(**kwargs)
