"""LoRA on embed_tokens/lm_head, modules_to_save and trainable tokens over an NF4 base.

The projections are NF4 with double quantization on both sides (bitsandbytes on CPU
with fp32 compute; ``hf.load_pretrained(quantize="nf4")`` here); embeddings and
lm_head stay dense on both, as bitsandbytes leaves them. Files go both ways.
"""

import jax
import numpy as np
import peft
import pytest
import torch
from conftest import bnb_4bit_model, saved_nf4_base
from test_lora import forward
from test_lora_embeddings_peft import (
    CASES,
    batch,
    jpeft_method,
    perturb,
    perturb_peft,
    relative_error,
)
from test_lora_peft import peft_logits

import jpeft
from jpeft.models import hf

NF4_CASES = ("both_patterns", "modules_to_save", "trainable_tokens")


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    cfg, _, path = saved_nf4_base(tmp_path_factory)
    _, params4 = hf.load_pretrained(path, quantize="nf4")
    return cfg, params4, path


@pytest.mark.parametrize("name", NF4_CASES)
def test_our_adapter_loads_in_peft_over_bitsandbytes(base, name, tmp_path):
    cfg, params4, path = base
    ids, mask = batch(cfg)
    method = jpeft_method(CASES[name])
    adapted = perturb(method.init(jax.random.key(1), params4, cfg))
    jpeft.save_hf_adapter(tmp_path, method, adapted, cfg)
    model = peft.PeftModel.from_pretrained(bnb_4bit_model(path), tmp_path).eval()
    err = relative_error(
        forward(adapted, cfg, ids, attention_mask=mask), peft_logits(model, ids, mask), mask
    )
    print(f"NF4 jpeft -> peft {name}: {err:.2e}")
    assert err < 1e-5


@pytest.mark.parametrize("name", NF4_CASES)
def test_peft_adapter_over_bitsandbytes_loads_here(base, name, tmp_path):
    cfg, params4, path = base
    ids, mask = batch(cfg)
    torch.manual_seed(0)
    config = peft.LoraConfig(r=4, lora_alpha=8, **CASES[name])
    model = peft.get_peft_model(bnb_4bit_model(path), config)
    perturb_peft(model)
    model.eval().save_pretrained(tmp_path)
    method, loaded = jpeft.load_hf_adapter(tmp_path, params4, cfg)
    assert method == jpeft_method(CASES[name])
    err = relative_error(
        forward(loaded, cfg, ids, attention_mask=mask), peft_logits(model, ids, mask), mask
    )
    print(f"NF4 peft -> jpeft {name}: {err:.2e}")
    assert err < 1e-5
    assert np.asarray(jax.tree.leaves(jpeft.split(loaded)[0])[0]).any()
