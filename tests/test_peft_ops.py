"""Adapter arithmetic, disabling, deleting and unloading adapters, checked against peft.

Each case builds the same two named LoRA adapters in peft and in jpeft (peft's files
loaded by jpeft), runs peft's operation on its model and jpeft's pure function on the
params, and compares the logits. ``pytest -s`` prints each case's max relative error.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import peft
import pytest
import torch
from conftest import hf_twin
from jax.experimental import checkify
from test_lora_peft import randomize_peft

import jpeft
from jpeft.lora import LoRA, adapter_ids, adapter_names, load_adapter, set_adapter
from jpeft.models import llama
from jpeft.models.generate import generate

X = LoRA(r=4, alpha=8, targets=("q_proj", "v_proj"), adapter_name="x")
Y = LoRA(r=4, alpha=2, targets=("v_proj", "up_proj"), adapter_name="y")
Z = LoRA(r=2, alpha=4, targets=("q_proj",), adapter_name="z")


def assert_matches(case, out, ref, mask, tol=1e-5):
    """Max relative logit error over valid tokens below ``tol`` (printed with ``-s``)."""
    valid = mask.astype(bool)
    err = np.abs(np.asarray(out) - ref)[valid].max() / np.abs(ref[valid]).max()
    print(f"{case}: max relative logit error {err:.2e}")
    assert err < tol, (case, err)


@pytest.fixture
def pair(params, cfg, tmp_path):
    """``(peft model, our params)`` holding adapters x then y (and z), randomized alike."""
    model = peft.get_peft_model(
        hf_twin(params, cfg), peft.LoraConfig(**X.adapter_config(cfg)), adapter_name="x"
    )
    for method in (Y, Z):
        model.add_adapter(method.adapter_name, peft.LoraConfig(**method.adapter_config(cfg)))
    randomize_peft(model)
    model.save_pretrained(tmp_path)
    ours = params
    for name in ("x", "y", "z"):
        _, ours = load_adapter(tmp_path / name, ours, cfg, name)
    return model.eval(), set_adapter(ours, "x")


def peft_logits(model, ids, mask, **kwargs):
    with torch.no_grad():
        return model(
            input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), **kwargs
        ).logits.numpy()


@functools.partial(jax.jit, static_argnums=1, static_argnames="disable_adapters")
def apply(params, cfg, ids, mask, adapter_ids=None, disable_adapters=False):
    return llama.Llama(cfg).apply(
        {"params": params},
        ids,
        attention_mask=mask,
        adapter_ids=adapter_ids,
        disable_adapters=disable_adapters,
    )


@pytest.mark.parametrize(
    "combination, adapters, weights",
    [
        ("linear", ["x", "y"], [0.7, -0.4]),
        ("cat", ["x", "y", "z"], [0.7, -0.4, 1.5]),
        ("svd", ["x", "y", "z"], [0.7, -0.4, 1.5]),
        ("linear", ["z"], [2.0]),
    ],
)
def test_add_weighted_adapter_matches_peft(pair, cfg, batch, combination, adapters, weights):
    model, ours = pair
    ids, mask = batch
    model.add_weighted_adapter(adapters, weights, "mix", combination_type=combination)
    model.set_adapter("mix")
    combined = jpeft.add_weighted_adapter(ours, adapters, weights, "mix", combination)
    assert adapter_names(combined) == ("x", "y", "z", "mix")
    out = apply(set_adapter(combined, "mix"), cfg, ids, mask)
    assert_matches(
        f"add_weighted_adapter {combination} {adapters}", out, peft_logits(model, ids, mask), mask
    )
    # the sources are untouched, and the new adapter is usable per row
    rows = adapter_ids(combined, ["mix", "x"])
    mixed = apply(combined, cfg, ids, mask, rows)
    np.testing.assert_allclose(mixed[1], apply(ours, cfg, ids, mask)[1], atol=1e-6)


def test_add_weighted_adapter_errors(pair):
    _, ours = pair
    with pytest.raises(ValueError, match="one rank"):
        jpeft.add_weighted_adapter(ours, ["x", "z"], [1.0, 1.0], "m", "linear")
    with pytest.raises(ValueError, match=r"unknown adapters \['w'\]"):
        jpeft.add_weighted_adapter(ours, ["x", "w"], [1.0, 1.0], "m", "cat")
    with pytest.raises(ValueError, match="already hold an adapter 'y'"):
        jpeft.add_weighted_adapter(ours, ["x"], [1.0], "y")
    with pytest.raises(ValueError, match="combination_type='ties'"):
        jpeft.add_weighted_adapter(ours, ["x", "y"], [1.0, 1.0], "m", "ties")


def test_disable_adapters_gives_peft_disable_adapter_logits(pair, params, cfg, batch):
    model, ours = pair
    ids, mask = batch
    with model.disable_adapter():
        ref = peft_logits(model, ids, mask)
    out = apply(ours, cfg, ids, mask, disable_adapters=True)
    assert_matches("disable_adapters (LoRA)", out, ref, mask)
    np.testing.assert_array_equal(out, apply(params, cfg, ids, mask))
    assert np.abs(np.asarray(apply(ours, cfg, ids, mask)) - out).max() > 1e-3


def test_delete_adapter_matches_peft(pair, cfg, batch):
    model, ours = pair
    ids, mask = batch
    model.delete_adapter("x")
    kept = jpeft.delete_adapter(ours, "x")
    assert adapter_names(kept) == ("y", "z")
    assert "x" not in kept["layers"]["self_attn"]["q_proj"]["kernel"].names
    rows = ["z", "__base__"]
    ref = peft_logits(model, ids, mask, adapter_names=rows)
    assert_matches(
        "delete_adapter", apply(kept, cfg, ids, mask, adapter_ids(kept, rows)), ref, mask
    )
    # x was active: the first remaining adapter becomes the active one (peft picks one
    # per module); choosing one explicitly gives peft's logits
    assert kept["layers"]["mlp"]["up_proj"]["kernel"].adapters[0].name == "y"
    model.set_adapter("y")
    active = apply(set_adapter(kept, "y"), cfg, ids, mask)
    assert_matches("delete_adapter then set_adapter", active, peft_logits(model, ids, mask), mask)
    with pytest.raises(ValueError, match=r"no adapter 'x'; params hold \['y', 'z'\]"):
        jpeft.delete_adapter(kept, "x")


def test_unload_gives_peft_unload_base(pair, params, cfg, batch):
    model, ours = pair
    ids, mask = batch
    base = jpeft.unload(ours)
    jax.tree.map(np.testing.assert_array_equal, base, params)
    hf = model.unload()
    with torch.no_grad():
        ref = hf(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask)).logits.numpy()
    assert_matches("unload", apply(base, cfg, ids, mask), ref, mask)


def test_unload_refuses_fully_trained_tensors(params):
    trained = {**params, "norm": {"scale": jpeft.Trained(params["norm"]["scale"])}}
    with pytest.raises(TypeError, match="Trained replaced a base tensor"):
        jpeft.unload(trained)


def test_out_of_range_adapter_ids_raise(pair, cfg, batch):
    _, ours = pair
    ids, mask = batch
    two = jpeft.delete_adapter(ours, "z")
    bad = np.array([0, 2], np.int32)
    message = r"rows \[1\] have ids \[2\]; params hold 2 adapters, so each id must be in -1..1"
    with pytest.raises(ValueError, match=message):
        llama.Llama(cfg).apply({"params": two}, ids, attention_mask=mask, adapter_ids=bad)
    with pytest.raises(ValueError, match=message):
        generate(two, cfg, ids, mask, max_new_tokens=2, adapter_ids=bad)
    with pytest.raises(ValueError, match=r"ids \[-2\]"):
        jpeft.check_adapter_ids(two, [-2, 1])
    # Under jit the ids are traced: unchecked (row 1 gets the base), or checked by checkify.
    unchecked = apply(two, cfg, ids, mask, jnp.asarray(bad))
    np.testing.assert_allclose(unchecked[1], apply(two, cfg, ids, mask, jnp.array([0, -1]))[1])

    def checked(params, rows):
        jpeft.check_adapter_ids(params, rows)
        return apply(params, cfg, ids, mask, rows)

    err, _ = checkify.checkify(jax.jit(checked))(two, jnp.asarray(bad))
    with pytest.raises(checkify.JaxRuntimeError, match=r"outside -1\.\.1"):
        err.throw()
    err, _ = checkify.checkify(jax.jit(checked))(two, jnp.array([1, -1]))
    assert err.get() is None
