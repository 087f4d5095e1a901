"""What peft users reach for besides the methods: inputs_embeds, model cards, float16 on
CPU, LLaMA-Adapter's zero gate, disabling a prompt method; against transformers and peft.

``pytest -s`` prints each case's max relative logit error.
"""

import jax
import jax.numpy as jnp
import numpy as np
import peft
import pytest
import torch
import yaml
from conftest import hf_twin, tiny_config
from test_peft_ops import assert_matches

import jpeft
from jpeft.adapters import LlamaAdapter
from jpeft.models import llama

BASE = "org/tiny-llama"


def embeds(cfg, batch):
    return np.random.RandomState(5).randn(*batch[0].shape, cfg.hidden_size).astype(np.float32)


def hf_logits(model, mask, **inputs):
    with torch.no_grad():
        inputs = {k: torch.tensor(v) for k, v in inputs.items()}
        return model(attention_mask=torch.tensor(mask), **inputs).logits.numpy()


def test_inputs_embeds_match_transformers(params, cfg, batch):
    _, mask = batch
    x = embeds(cfg, batch)
    ref = hf_logits(hf_twin(params, cfg), mask, inputs_embeds=x)
    out = llama.Llama(cfg).apply({"params": params}, inputs_embeds=x, attention_mask=mask)
    assert_matches("inputs_embeds (transformers)", out, ref, mask)
    with pytest.raises(ValueError, match="exactly one of input_ids and inputs_embeds"):
        llama.forward(params, cfg, batch[0], inputs_embeds=x)
    with pytest.raises(ValueError, match=r"expected shape \[B, T, 32\], found \(2, 9, 8\)"):
        llama.forward(params, cfg, inputs_embeds=x[..., :8])


def test_inputs_embeds_and_disabled_prompt_match_peft(params, cfg, batch, tmp_path):
    ids, mask = batch
    x = embeds(cfg, batch)
    method = jpeft.PromptTuning(num_virtual_tokens=3)
    adapted = method.init(jax.random.key(1), params, cfg)
    jpeft.save_hf_adapter(tmp_path, method, adapted, cfg)
    model = peft.PeftModel.from_pretrained(hf_twin(params, cfg), tmp_path).eval()
    ref = hf_logits(model, mask, inputs_embeds=x)[:, -ids.shape[1] :]
    out = llama.forward(adapted, cfg, inputs_embeds=jnp.asarray(x), attention_mask=mask)
    assert_matches("inputs_embeds (peft prompt tuning)", out, ref, mask)
    with model.disable_adapter():
        ref = hf_logits(model, mask, input_ids=ids)
    out = llama.Llama(cfg).apply(
        {"params": adapted}, ids, attention_mask=mask, disable_adapters=True
    )
    assert_matches("disable_adapters (prompt tuning)", out, ref, mask)


def front_matter(path):
    text = path.read_text()
    assert text.startswith("---\n")
    return yaml.safe_load(text[4 : text.index("\n---\n", 4)]), text


def test_model_card_as_peft_writes_it(params, cfg, batch, tmp_path):
    hf = hf_twin(params, cfg)
    hf.config._name_or_path = BASE
    config = peft.LoraConfig(r=2, target_modules=["q_proj"], task_type="CAUSAL_LM")
    model = peft.get_peft_model(hf, config)
    model.save_pretrained(tmp_path / "peft")
    theirs, _ = front_matter(tmp_path / "peft" / "README.md")
    method = jpeft.LoRA(r=2, targets=("q_proj",))
    adapted = method.init(jax.random.key(1), params, cfg)
    jpeft.save_hf_adapter(tmp_path / "ours", method, adapted, cfg, base_model_name_or_path=BASE)
    ours, _ = front_matter(tmp_path / "ours" / "README.md")
    for key in ("library_name", "base_model", "pipeline_tag"):
        assert ours[key] == theirs[key], key
    assert ours["tags"] == ["base_model:adapter:" + BASE, "lora"]
    # an existing card keeps its text and fields; ours are set
    card = tmp_path / "ours" / "README.md"
    card.write_text("---\nlicense: mit\nlibrary_name: other\n---\n# My adapter\n")
    jpeft.save_hf_adapter(tmp_path / "ours", method, adapted, cfg, base_model_name_or_path=BASE)
    meta, text = front_matter(card)
    assert meta["license"] == "mit" and meta["library_name"] == "peft"
    assert text.endswith("\n---\n# My adapter\n")
    peft.PeftModel.from_pretrained(hf_twin(params, cfg), tmp_path / "ours")  # still loads


def test_model_card_of_an_own_format_adapter_does_not_point_to_peft(params, cfg, tmp_path):
    method = jpeft.Adapter(bottleneck=4)
    adapted = method.init(jax.random.key(1), params, cfg)
    jpeft.save_hf_adapter(tmp_path, method, adapted, cfg, base_model_name_or_path=BASE)
    meta, text = front_matter(tmp_path / "README.md")
    assert meta["library_name"] == "jpeft"
    assert "which peft cannot load" in text and "PeftModel" not in text
    with pytest.raises(KeyError, match=method.peft_type):  # what peft does with it
        peft.PeftModel.from_pretrained(hf_twin(params, cfg), tmp_path)


def test_float16_params_compute_in_float32_on_cpu(params, cfg, batch):
    ids, mask = batch
    half = jax.tree.map(lambda a: a.astype(jnp.float16), params)
    out = llama.Llama(cfg, dtype=jnp.float16).apply({"params": half}, ids, attention_mask=mask)
    assert out.dtype == jnp.float32
    rounded = jax.tree.map(lambda a: a.astype(jnp.float32), half)
    ref = hf_logits(hf_twin(rounded, cfg), mask, input_ids=ids)
    assert_matches("float16 params (fp32 on the rounded weights)", out, ref, mask)
    ref = hf_logits(hf_twin(params, cfg), mask, input_ids=ids)
    assert_matches("float16 params (fp32 on the fp32 weights)", out, ref, mask, tol=1e-3)


@pytest.mark.parametrize("layers", [2, 3])
def test_zero_gate_llama_adapter_is_the_base_bit_for_bit(layers, batch):
    cfg = tiny_config(num_hidden_layers=layers)
    params = llama.init_params(jax.random.key(0), cfg)
    ids, mask = batch
    adapted = LlamaAdapter(adapter_len=4, adapter_layers=2).init(jax.random.key(1), params, cfg)
    for impl in ("auto", "xla"):
        base = llama.forward(params, cfg, ids, attention_mask=mask, attention_impl=impl)
        out = llama.forward(adapted, cfg, ids, attention_mask=mask, attention_impl=impl)
        np.testing.assert_array_equal(out, base)
