"""Several named LoRA adapters in one params tree; mixed-adapter batches against peft."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import peft
import pytest
import torch
from conftest import hf_twin
from test_lora import forward, layer_of, project, randomize
from test_lora_peft import assert_close, randomize_peft

import jpeft
from jpeft.lora import (
    InactiveLoRAAdapter,
    LoRA,
    LoRAAdapter,
    adapter_ids,
    adapter_names,
    load_adapter,
    set_adapter,
)
from jpeft.models import llama
from jpeft.models.cache import KVCache
from jpeft.models.context import Context
from jpeft.models.linear import matmul

A = LoRA(r=4, alpha=8, targets=("q_proj", "v_proj"), adapter_name="x")
B = LoRA(r=2, alpha=4, targets=("v_proj", "up_proj"), adapter_name="y")
ROWS = ["x", "__base__", "y", "x"]


@pytest.fixture
def two(params, cfg):
    """Params holding adapters "x" then "y" (y active), both randomized."""
    return randomize(B.init(jax.random.key(2), A.init(jax.random.key(1), params, cfg), cfg))


@pytest.fixture
def v_layer(params, cfg):
    """Layer 0 of v_proj holding adapters "x" (LoRA) and "y" (DoRA), randomized."""
    dora = dataclasses.replace(B, use_dora=True)
    both = randomize(dora.init(jax.random.key(2), A.init(jax.random.key(1), params, cfg), cfg))
    return layer_of(kernel(both, "self_attn", "v_proj"), 0)


@pytest.fixture
def rows(cfg):
    rs = np.random.RandomState(1)
    ids = rs.randint(0, cfg.vocab_size, (4, 7)).astype(np.int32)
    mask = np.ones((4, 7), np.int32)
    mask[3, 5:] = 0
    return ids, mask


def kernel(params, group, module):
    return params["layers"][group][module]["kernel"]


@functools.partial(jax.jit, static_argnums=1)
def apply_ids(params, cfg, ids, mask, adapter_ids):
    """The public path: ``Llama.apply(..., adapter_ids=...)``."""
    model = llama.Llama(cfg)
    return model.apply({"params": params}, ids, attention_mask=mask, adapter_ids=adapter_ids)


@functools.partial(jax.jit, static_argnums=1)
def cached(params, cfg, tokens, cache, adapter_ids):
    ctx = Context(adapter_ids=adapter_ids)
    return llama.forward(params, cfg, tokens, cache=cache, ctx=ctx)


@jax.jit
def project_rows(w, x, adapter_ids):
    return matmul(w, x, Context(adapter_ids=adapter_ids), "v_proj")


def apply_mixed(params, cfg, ids, mask, names):
    return apply_ids(params, cfg, ids, mask, adapter_ids(params, names))


def test_adding_an_adapter_makes_it_the_active_one(two):
    assert adapter_names(two) == ("x", "y")
    v = kernel(two, "self_attn", "v_proj")
    assert [type(ad) for ad in v.adapters] == [InactiveLoRAAdapter, LoRAAdapter]
    assert kernel(two, "self_attn", "q_proj").names == ("x",)
    assert kernel(two, "mlp", "up_proj").names == ("y",)
    trainable, _ = jpeft.split(two)
    adapters = jax.tree.leaves(trainable, is_leaf=lambda x: isinstance(x, LoRAAdapter))
    assert {ad.name for ad in adapters if isinstance(ad, LoRAAdapter)} == {"y"}
    switched = set_adapter(two, "x")
    assert [type(ad) for ad in kernel(switched, "self_attn", "v_proj").adapters] == [
        LoRAAdapter,
        InactiveLoRAAdapter,
    ]


def test_adapter_errors(two, cfg):
    with pytest.raises(ValueError, match="already hold an adapter named 'x'"):
        A.init(jax.random.key(0), two, cfg)
    with pytest.raises(ValueError, match=r"unknown adapters \['c'\]"):
        set_adapter(two, ["x", "c"])
    with pytest.raises(ValueError, match=r"unknown adapters \['c'\]"):
        adapter_ids(two, ["x", "c"])


def test_mixed_batch_equals_separate_runs(two, params, cfg, rows):
    ids, mask = rows
    mixed = apply_mixed(two, cfg, ids, mask, ROWS)
    separate = {
        "x": forward(set_adapter(two, "x"), cfg, ids, attention_mask=mask),
        "y": forward(two, cfg, ids, attention_mask=mask),
        "__base__": forward(params, cfg, ids, attention_mask=mask),
    }
    for row, name in enumerate(ROWS):
        np.testing.assert_allclose(mixed[row], separate[name][row], atol=1e-6, err_msg=name)


def test_mixed_batch_with_dora_equals_separate_runs(v_layer, cfg):
    x = np.random.RandomState(3).randn(4, 5, cfg.hidden_size).astype(np.float32)
    mixed = project_rows(v_layer, x, jnp.array([0, -1, 1, 0]))
    separate = {0: project(set_adapter(v_layer, "x"), x), 1: project(v_layer, x)}
    separate[-1] = x @ v_layer.base
    for row, index in enumerate([0, -1, 1, 0]):
        np.testing.assert_allclose(mixed[row], separate[index][row], atol=1e-6)


def test_merging_two_active_adapters(v_layer, cfg):
    both = set_adapter(v_layer, ["x", "y"])
    x = np.random.RandomState(3).randn(2, 5, cfg.hidden_size).astype(np.float32)
    merged = jpeft.merge(both)
    np.testing.assert_allclose(x @ np.asarray(merged), project(both, x), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(jpeft.unmerge(merged, both).base, v_layer.base, atol=1e-6)


def test_mixed_batch_matches_peft(params, cfg, rows, tmp_path):
    ids, mask = rows
    model = peft.get_peft_model(
        hf_twin(params, cfg), peft.LoraConfig(**A.adapter_config(cfg)), adapter_name="x"
    )
    model.add_adapter("y", peft.LoraConfig(**B.adapter_config(cfg)))
    randomize_peft(model)
    model.save_pretrained(tmp_path)  # non-default adapter names go to sub-directories
    # (peft refuses mixed batches with DoRA; ours are checked against separate runs above)
    _, ours = load_adapter(tmp_path / "x", params, cfg, "x")
    _, ours = load_adapter(tmp_path / "y", ours, cfg, "y")
    model.eval()
    with torch.no_grad():
        ref = model(
            input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), adapter_names=ROWS
        ).logits.numpy()
    assert_close(apply_mixed(ours, cfg, ids, mask, ROWS), ref, mask)


def test_decoding_with_mixed_adapters_matches_the_full_forward(two, cfg, rows):
    ids, _ = rows
    mask = np.ones_like(ids)
    full = apply_mixed(two, cfg, ids, mask, ROWS)
    rows_ids = adapter_ids(two, ROWS)
    cache = KVCache.create(cfg, batch_size=4, max_len=ids.shape[1])
    logits, cache = cached(two, cfg, ids[:, :5], cache, rows_ids)
    steps = [logits]
    for t in range(5, ids.shape[1]):
        logits, cache = cached(two, cfg, ids[:, t : t + 1], cache, rows_ids)
        steps.append(logits)
    np.testing.assert_allclose(jnp.concatenate(steps, axis=1), full, atol=1e-5)
