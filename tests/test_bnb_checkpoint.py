"""Pre-quantized bitsandbytes 4-bit checkpoints (as transformers saves them) load bit-exactly."""

import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from conftest import bnb_4bit_model, saved_nf4_base
from safetensors.numpy import load_file, save_file

import jpeft
from jpeft import quant
from jpeft.models import hf, llama


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    return saved_nf4_base(tmp_path_factory)[2]


def _save_bnb(base_dir, out, max_shard_size="5GB", **settings):
    """Write the 4-bit checkpoint transformers + bitsandbytes make of ``base_dir``."""
    bnb_4bit_model(base_dir, **settings).save_pretrained(out, max_shard_size=max_shard_size)
    return out


@pytest.fixture(scope="module")
def nf4_dir(base_dir, tmp_path_factory):
    return _save_bnb(base_dir, tmp_path_factory.mktemp("nf4"))


def _assert_identical(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        assert x.dtype == y.dtype
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.mark.parametrize(
    ("quant_type", "double_quant"), [("nf4", True), ("nf4", False), ("fp4", True)]
)
def test_checkpoint_loads_as_our_own_quantization(base_dir, tmp_path, quant_type, double_quant):
    path = _save_bnb(base_dir, tmp_path, quant_type=quant_type, double_quant=double_quant)
    _, loaded = hf.load_pretrained(path)
    _, ours = hf.load_pretrained(
        base_dir,
        quantize=lambda kernel, module: quant.quantize(kernel, quant_type, 64, double_quant),
    )
    _assert_identical(loaded, ours)


def test_logits_equal_transformers_bitsandbytes(base_dir, nf4_dir):
    cfg, params = hf.load_pretrained(nf4_dir)
    ids = np.random.RandomState(0).randint(0, cfg.vocab_size, (2, 9))
    with torch.no_grad():
        ref = bnb_4bit_model(base_dir)(torch.tensor(ids)).logits.numpy()
    out = np.asarray(llama.forward(params, cfg, jnp.asarray(ids)))
    assert np.abs(out - ref).max() / np.abs(ref).max() < 1e-5


def test_sharded_checkpoint_loads_the_same(base_dir, nf4_dir, tmp_path):
    _save_bnb(base_dir, tmp_path, max_shard_size="20KB")
    assert os.path.exists(tmp_path / "model.safetensors.index.json")
    _assert_identical(hf.load_pretrained(tmp_path)[1], hf.load_pretrained(nf4_dir)[1])


def test_skipped_modules_stay_dense(base_dir, tmp_path):
    path = _save_bnb(base_dir, tmp_path, llm_int8_skip_modules=["down_proj", "lm_head"])
    _, params = hf.load_pretrained(path)
    mlp = params["layers"]["mlp"]
    assert isinstance(mlp["up_proj"]["kernel"], quant.QuantizedWeight)
    assert isinstance(mlp["down_proj"]["kernel"], jax.Array)


def test_qlora_keeps_matching_weights_and_rejects_other_settings(nf4_dir):
    cfg, params = hf.load_pretrained(nf4_dir)
    adapted = jpeft.QLoRA(r=4).init(jax.random.key(1), params, cfg)
    kernel = adapted["layers"]["self_attn"]["q_proj"]["kernel"].base
    assert kernel is params["layers"]["self_attn"]["q_proj"]["kernel"]
    with pytest.raises(ValueError, match=r"already quantized with .*'blocksize': 64"):
        jpeft.QLoRA(r=4, blocksize=128).init(jax.random.key(1), params, cfg)


def _rewrite(src, dst, edit):
    """Copy checkpoint ``src`` to ``dst`` with ``edit(tensors, config)`` applied in place."""
    shutil.copytree(src, dst)
    tensors = load_file(dst / "model.safetensors")
    with open(dst / "config.json") as f:
        config = json.load(f)
    edit(tensors, config)
    save_file(tensors, dst / "model.safetensors", metadata={"format": "pt"})
    with open(dst / "config.json", "w") as f:
        json.dump(config, f)
    return dst


KEY = "model.layers.1.mlp.up_proj.weight"


def _state(tensors):
    return json.loads(tensors[f"{KEY}.quant_state.bitsandbytes__nf4"].tobytes())


def _set_state(tensors, state):
    raw = np.frombuffer(json.dumps(state).encode(), np.uint8).copy()
    tensors[f"{KEY}.quant_state.bitsandbytes__nf4"] = raw


def _drop(name):
    return lambda tensors, config: tensors.pop(f"{KEY}.{name}")


def _wrong_shape(tensors, config):
    _set_state(tensors, {**_state(tensors), "shape": [64, 128]})


def _eight_bit(tensors, config):
    config["quantization_config"].update(load_in_4bit=False, load_in_8bit=True)


def _unknown_method(tensors, config):
    config["quantization_config"]["quant_method"] = "gptq"


def _one_layer_dense(tensors, config):
    for name in [k for k in tensors if k.startswith(f"{KEY}.")]:
        del tensors[name]
    tensors[KEY] = np.zeros((128, 64), np.float32)


def _custom_map(tensors, config):
    tensors[f"{KEY}.quant_map"] = tensors[f"{KEY}.quant_map"] * 2


def _nan_absmax(tensors, config):
    tensors[f"{KEY}.nested_absmax"] = tensors[f"{KEY}.nested_absmax"].copy()
    tensors[f"{KEY}.nested_absmax"][0] = np.nan


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (_drop("quant_state.bitsandbytes__nf4"), "missing tensor .*quant_state.bitsandbytes__nf4"),
        (_drop("nested_absmax"), f"missing tensor '{KEY}.nested_absmax' .*packed weight"),
        (_drop("absmax"), f"missing tensor '{KEY}.absmax'"),
        (_wrong_shape, f"{KEY}: quant_state .* does not match"),
        (_custom_map, f"{KEY}.quant_map: not the standard"),
        (_nan_absmax, f"model.safetensors: tensor '{KEY}.nested_absmax' holds non-finite .*1 NaN"),
        (_eight_bit, "only bitsandbytes 4-bit"),
        (_unknown_method, "quant_method='gptq' has no registered reader"),
        (_one_layer_dense, r"up_proj is quantized in layers \[0\] only"),
    ],
    ids=[
        "no_quant_state",
        "no_nested_absmax",
        "no_absmax",
        "wrong_shape",
        "custom_map",
        "nan_absmax",
        "eight_bit",
        "unknown_method",
        "one_layer_dense",
    ],
)
def test_bad_checkpoint_gives_a_clear_error(nf4_dir, tmp_path, edit, message):
    path = _rewrite(nf4_dir, tmp_path / "bad", edit)
    with pytest.raises(ValueError, match=message):
        hf.load_pretrained(path)


def test_quantizing_an_already_quantized_checkpoint_is_refused(nf4_dir):
    with pytest.raises(ValueError, match=r"already quantized .* without quantize='nf4'"):
        hf.load_pretrained(nf4_dir, quantize="nf4")
