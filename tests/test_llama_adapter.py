"""LLaMA-Adapter (peft's adaption prompt) against peft."""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import peft
import pytest
import torch
from conftest import hf_twin, sgd_train, tiny_config
from safetensors.numpy import load_file

import jpeft
from jpeft.adapters import LlamaAdapter
from jpeft.models import llama


def _peft_model(params, cfg, adapter_len, adapter_layers):
    config = peft.AdaptionPromptConfig(
        adapter_len=adapter_len, adapter_layers=adapter_layers, task_type="CAUSAL_LM"
    )
    model = peft.get_peft_model(hf_twin(params, cfg), config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "adaption_gate" in name:
                p.normal_()  # open the gates so the prompts matter
    return model.eval()


@pytest.mark.parametrize("kv_heads", [4, 2, 1])
def test_peft_adapter_loads_with_equal_logits(kv_heads, batch, tmp_path):
    cfg = tiny_config(num_hidden_layers=3, num_key_value_heads=kv_heads)
    params = llama.init_params(jax.random.key(0), cfg)
    ids, mask = batch
    model = _peft_model(params, cfg, adapter_len=5, adapter_layers=2)
    model.save_pretrained(tmp_path)
    method, adapted = jpeft.load_hf_adapter(tmp_path, params, cfg)
    assert method == LlamaAdapter(adapter_len=5, adapter_layers=2)
    with torch.no_grad():
        ref = model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask)).logits.numpy()
    out = np.asarray(
        llama.forward(adapted, cfg, jnp.asarray(ids), attention_mask=jnp.asarray(mask))
    )
    valid = mask.astype(bool)
    np.testing.assert_allclose(out[valid], ref[valid], rtol=1e-5, atol=2e-6)


def test_peft_loads_ours_with_equal_logits(params, cfg, batch, tmp_path):
    ids, _ = batch
    method = LlamaAdapter(adapter_len=3, adapter_layers=1)
    adapted = method.init(jax.random.key(1), params, cfg)
    node = adapted["adaption"]
    adapted = {**adapted, "adaption": dataclasses.replace(node, gate=jnp.full_like(node.gate, 0.7))}
    jpeft.save_hf_adapter(tmp_path, method, adapted, cfg)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["peft_type"] == "ADAPTION_PROMPT"
    assert set(load_file(tmp_path / "adapter_model.safetensors")) == {
        "base_model.model.model.layers.1.self_attn.adaption_prompt",
        "base_model.model.model.layers.1.self_attn.adaption_gate",
    }
    model = peft.PeftModel.from_pretrained(hf_twin(params, cfg), tmp_path).eval()
    with torch.no_grad():
        ref = model(input_ids=torch.tensor(ids)).logits.numpy()
    out = np.asarray(llama.forward(adapted, cfg, jnp.asarray(ids)))
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=2e-6)


def test_zero_gate_starts_at_base_and_training_moves_only_adapter(params, cfg, batch):
    ids, _ = batch
    adapted = LlamaAdapter(adapter_len=4, adapter_layers=2).init(jax.random.key(1), params, cfg)
    np.testing.assert_array_equal(  # bit for bit (see also test_peft_extras)
        np.asarray(llama.forward(adapted, cfg, jnp.asarray(ids))),
        np.asarray(llama.forward(params, cfg, jnp.asarray(ids))),
    )
    # The random base's attention outputs are tiny (init std 0.02), so the gated
    # branch needs a large SGD step to move the loss within a few steps.
    trained, losses = sgd_train(adapted, cfg, jnp.asarray(ids), steps=15, lr=50.0)
    assert losses[-1] < losses[0] - 0.05
    assert np.abs(np.asarray(trained["adaption"].gate)).max() > 0
    jax.tree.map(np.testing.assert_array_equal, jpeft.split(trained)[1], jpeft.split(adapted)[1])


@pytest.mark.parametrize(
    "kwargs, match",
    [(dict(adapter_len=0), "adapter_len"), (dict(adapter_layers=5), "adapter_layers")],
)
def test_bad_options(params, cfg, kwargs, match):
    with pytest.raises(ValueError, match=match):
        LlamaAdapter(**kwargs).init(jax.random.key(0), params, cfg)
