"""peft's ``LoraConfig(lora_bias=True)``: a bias on lora_B, both ways with peft, and merging.

peft computes ``y = base(x) + scaling * lora_B(lora_A(x))`` with ``lora_B`` an
``nn.Linear`` with a bias, saved as ``...lora_B.bias``; merging adds ``scaling * bias``
to the base layer's bias and is refused for a layer without one.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import peft
import pytest
from conftest import hf_twin, tiny_config
from safetensors.numpy import load_file
from test_lora import randomize
from test_lora_peft import peft_logits, randomize_peft

import jpeft
from jpeft.lora import LoRA, LoRAWeight
from jpeft.models import llama
from jpeft.models.generate import merge_for_decoding

CONFIG = {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj", "down_proj"]}
METHOD = LoRA(r=4, alpha=8, targets=("down_proj", "q_proj", "v_proj"), lora_bias=True)


def _biased_cfg():
    return tiny_config(attention_bias=True, mlp_bias=True)


def _rel_err(out, ref, mask):
    valid = mask.astype(bool)
    return float(np.abs(np.asarray(out) - ref)[valid].max() / np.abs(ref[valid]).max())


def _with_random_biases(params, seed=1):
    """``params`` with random B and random LoRA biases (peft and our init make both zero)."""
    rs = np.random.RandomState(seed)

    def fill(x):
        if not isinstance(x, LoRAWeight):
            return x
        ads = tuple(
            dataclasses.replace(ad, bias=jnp.asarray(0.3 * rs.randn(*ad.bias.shape), jnp.float32))
            for ad in x.adapters
        )
        return LoRAWeight(x.base, ads)

    is_lora = lambda x: isinstance(x, LoRAWeight)
    return jax.tree.map(fill, randomize(params), is_leaf=is_lora)


def _peft_model(params, cfg):
    model = peft.get_peft_model(hf_twin(params, cfg), peft.LoraConfig(**CONFIG, lora_bias=True))
    randomize_peft(model)  # also draws the lora_B biases
    return model.eval()


@pytest.mark.parametrize("biased_base", [False, True])
def test_peft_lora_bias_adapter_loads(biased_base, batch, tmp_path):
    cfg = _biased_cfg() if biased_base else tiny_config()
    params = llama.init_params(jax.random.key(0), cfg)
    ids, mask = batch
    model = _peft_model(params, cfg)
    model.save_pretrained(tmp_path)
    saved = load_file(tmp_path / "adapter_model.safetensors")
    key = "base_model.model.model.layers.1.mlp.down_proj.lora_B.bias"
    assert saved[key].shape == (cfg.hidden_size,) and np.abs(saved[key]).max() > 0
    method, adapted = jpeft.load_hf_adapter(tmp_path, params, cfg)
    assert method.lora_bias
    err = _rel_err(
        llama.forward(adapted, cfg, jnp.asarray(ids), attention_mask=mask),
        peft_logits(model, ids, mask),
        mask,
    )
    assert err < 1e-5, err


def test_our_lora_bias_adapter_loads_in_peft(params, cfg, batch, tmp_path):
    ids, mask = batch
    adapted = _with_random_biases(METHOD.init(jax.random.key(1), params, cfg))
    jpeft.save_hf_adapter(tmp_path, METHOD, adapted, cfg)
    saved = load_file(tmp_path / "adapter_model.safetensors")
    assert sum(k.endswith("lora_B.bias") for k in saved) == 3 * cfg.num_hidden_layers
    model = peft.PeftModel.from_pretrained(hf_twin(params, cfg), tmp_path).eval()
    assert model.peft_config["default"].lora_bias
    out = llama.forward(adapted, cfg, jnp.asarray(ids), attention_mask=mask)
    err = _rel_err(out, peft_logits(model, ids, mask), mask)
    assert err < 1e-5, err


def test_merge_folds_the_bias_like_peft(batch, tmp_path):
    cfg = _biased_cfg()
    params = llama.init_params(jax.random.key(0), cfg)
    params = jax.tree.map(lambda x: x + 0.1 if x.ndim == 2 else x, params)  # nonzero biases
    ids, mask = batch
    model = _peft_model(params, cfg)
    model.save_pretrained(tmp_path)
    _, adapted = jpeft.load_hf_adapter(tmp_path, params, cfg)
    merged = jpeft.merge(adapted)
    ref_model = model.merge_and_unload()
    ref_bias = ref_model.model.layers[1].mlp.down_proj.bias.detach().numpy()
    np.testing.assert_allclose(merged["layers"]["mlp"]["down_proj"]["bias"][1], ref_bias, atol=1e-6)
    assert not isinstance(merged["layers"]["mlp"]["down_proj"]["kernel"], LoRAWeight)
    err = _rel_err(
        llama.forward(merged, cfg, jnp.asarray(ids), attention_mask=mask),
        peft_logits(ref_model, ids, mask),
        mask,
    )
    assert err < 1e-5, err
    restored = jpeft.unmerge(merged, adapted)
    np.testing.assert_allclose(
        restored["layers"]["mlp"]["down_proj"]["kernel"].base,
        params["layers"]["mlp"]["down_proj"]["kernel"],
        atol=1e-6,
    )


def test_merge_without_a_base_bias_is_refused_as_in_peft(params, cfg, batch):
    adapted = _with_random_biases(METHOD.init(jax.random.key(1), params, cfg))
    with pytest.raises(RuntimeError, match="base layer has no bias"):
        _peft_model(params, cfg).merge_and_unload()
    with pytest.raises(ValueError, match="layers/mlp/down_proj has an adapter bias"):
        jpeft.merge(adapted)
    # decoding merges what folds into a plain weight: a biased adapter stays a node
    ids, _ = batch
    kept = merge_for_decoding(adapted)
    assert isinstance(kept["layers"]["mlp"]["down_proj"]["kernel"], LoRAWeight)
    np.testing.assert_allclose(
        llama.forward(kept, cfg, jnp.asarray(ids)), llama.forward(adapted, cfg, jnp.asarray(ids))
    )


def test_the_bias_trains_without_decay(params, cfg):
    adapted = METHOD.init(jax.random.key(1), params, cfg)
    trainable, _ = jpeft.split(adapted)
    ad = trainable["layers"]["self_attn"]["q_proj"]["kernel"].adapters[0]
    assert ad.bias.shape == (cfg.num_hidden_layers, cfg.hidden_size)
    assert "bias" not in type(ad).decayed_fields(ad, "kernel")
    with pytest.raises(ValueError, match="lora_bias=True is not supported with DoRA"):
        LoRA(lora_bias=True, use_dora=True)
