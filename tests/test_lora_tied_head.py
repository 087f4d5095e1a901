"""LoRA on an ``lm_head`` tied to ``embed_tokens``, both ways with peft, fp32 and NF4 bases.

peft 0.21 wraps the tied ``lm_head`` in a LoRA ``Linear`` over the shared weight: before
merging the logits are ``x E^T + scaling * x A B`` and the input lookup is ``E``; its
``merge_and_unload`` adds the delta to the one shared table, so the tie is kept and the
input embedding changes too. jpeft's merged params keep one table and no ``lm_head``
kernel, and the saved model loads in transformers tied, with peft's merged logits. A
LoRA on ``embed_tokens`` as well (peft supports the pair) adds its own delta to the same
table on merge.
"""

import jax
import numpy as np
import peft
import pytest
import torch
import transformers
from conftest import bnb_4bit_model, hf_twin, saved_nf4_base, tiny_config
from test_lora import forward
from test_lora_embeddings_peft import batch, ours_in_peft, peft_here, relative_error
from test_lora_peft import peft_logits

import jpeft
from jpeft.models import hf, llama
from jpeft.models.hf_names import hf_state_dict
from jpeft.models.hf_save import save_pretrained

CASES = ("lm_head", "both_patterns")  # the lm_head alone; with embed_tokens and patterns
"""Names of cases of :mod:`test_lora_embeddings_peft`, here on a tied model."""


def is_tied(model: transformers.LlamaForCausalLM) -> bool:
    return model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()


def peft_merged(hf_model, path):
    """peft's ``merge_and_unload`` of the adapter at ``path`` over ``hf_model`` (checked tied)."""
    with torch.no_grad():
        merged = peft.PeftModel.from_pretrained(hf_model, path).merge_and_unload()
    assert is_tied(merged)
    return merged


def check_merged(loaded, cfg, merged_ref, label):
    """jpeft's merge of ``loaded`` keeps the tie and gives ``merged_ref``'s logits."""
    merged = jpeft.merge(loaded)
    assert "lm_head" not in merged
    assert isinstance(merged["embed_tokens"]["embedding"], jax.Array)
    ids, mask = batch(cfg)
    ref = peft_logits(merged_ref, ids, mask)
    unmerged = np.asarray(forward(loaded, cfg, ids, attention_mask=mask))
    assert relative_error(unmerged, ref, mask) > 1e-3  # merging moved the input embedding
    err = relative_error(forward(merged, cfg, ids, attention_mask=mask), ref, mask)
    print(f"merged {label}: {err:.2e}")
    assert err < 1e-5
    return merged


@pytest.mark.parametrize("name", CASES)
def test_our_adapter_loads_in_peft(name, tmp_path):
    cfg = tiny_config(tie_word_embeddings=True)
    params = llama.init_params(jax.random.key(0), cfg)
    assert ours_in_peft(name, params, cfg, hf_twin(params, cfg), tmp_path, f"tied {name}") < 1e-5


@pytest.mark.parametrize("name", CASES)
def test_peft_adapter_loads_and_merges_tied(name, tmp_path):
    cfg = tiny_config(tie_word_embeddings=True)
    params = llama.init_params(jax.random.key(0), cfg)
    err, loaded = peft_here(name, params, cfg, hf_twin(params, cfg), tmp_path, f"tied {name}")
    assert err < 1e-5
    ref = peft_merged(hf_twin(params, cfg), tmp_path)
    merged = check_merged(loaded, cfg, ref, f"tied {name}")
    want = {k: v.detach().numpy() for k, v in ref.state_dict().items()}
    for key, value in hf_state_dict(merged, cfg).items():
        np.testing.assert_allclose(value, want[key], rtol=1e-5, atol=1e-6, err_msg=key)
    # saved, it loads in transformers as a tied model with peft's merged logits
    save_pretrained(tmp_path / "merged", cfg, merged)
    reloaded = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "merged").eval()
    assert is_tied(reloaded)
    ids, mask = batch(cfg)
    err = relative_error(peft_logits(reloaded, ids, mask), peft_logits(ref, ids, mask), mask)
    assert err < 1e-5


def test_adapter_is_on_the_shared_table_and_starts_as_the_base():
    cfg = tiny_config(tie_word_embeddings=True)
    params = llama.init_params(jax.random.key(0), cfg)
    method = jpeft.LoRA(r=4, alpha=8, targets=("embed_tokens", "lm_head"))
    adapted = method.init(jax.random.key(1), params, cfg)
    assert "lm_head" not in adapted
    emb, head = adapted["embed_tokens"]["embedding"].adapters
    assert (emb.tied_lm_head, head.tied_lm_head) == (False, True)
    # the head's adapter is a linear's [hidden, r] x [r, vocab], B zero as peft's
    assert head.a.shape == (cfg.hidden_size, 4) and head.b.shape == (4, cfg.vocab_size)
    assert not np.asarray(head.b).any()
    ids, mask = batch(cfg)
    np.testing.assert_array_equal(
        forward(adapted, cfg, ids, attention_mask=mask),
        forward(params, cfg, ids, attention_mask=mask),
    )


@pytest.fixture(scope="module")
def nf4_base(tmp_path_factory):
    cfg, _, path = saved_nf4_base(tmp_path_factory, tie_word_embeddings=True)
    _, params4 = hf.load_pretrained(path, quantize="nf4")
    return cfg, params4, path


@pytest.mark.parametrize("name", CASES)
def test_nf4_our_adapter_loads_in_peft_over_bitsandbytes(nf4_base, name, tmp_path):
    cfg, params4, path = nf4_base
    model = bnb_4bit_model(path)
    assert is_tied(model)
    assert ours_in_peft(name, params4, cfg, model, tmp_path, f"NF4 tied {name}") < 1e-5


@pytest.mark.parametrize("name", CASES)
def test_nf4_peft_adapter_loads_and_merges_tied(nf4_base, name, tmp_path):
    """Over NF4 the table stays dense (bitsandbytes leaves embeddings alone) and merges into
    peft's table exactly; peft requantizes the merged projections (it warns of rounding),
    so the logits after merging are compared over the fp32 base only."""
    cfg, params4, path = nf4_base
    err, loaded = peft_here(name, params4, cfg, bnb_4bit_model(path), tmp_path, f"NF4 tied {name}")
    assert err < 1e-5
    ref = peft_merged(bnb_4bit_model(path), tmp_path)
    merged = jpeft.merge(loaded)
    assert "lm_head" not in merged
    np.testing.assert_allclose(
        merged["embed_tokens"]["embedding"],
        ref.model.embed_tokens.weight.detach().numpy(),
        rtol=1e-5,
        atol=1e-6,
    )
