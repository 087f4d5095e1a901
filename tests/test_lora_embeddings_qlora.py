"""LoRA on embed_tokens/lm_head, modules_to_save and trainable tokens over an NF4 base.

The projections are NF4 with double quantization on both sides (bitsandbytes on CPU
with fp32 compute; ``hf.load_pretrained(quantize="nf4")`` here); embeddings and
lm_head stay dense on both, as bitsandbytes leaves them. Files go both ways.
"""

import pytest
from conftest import bnb_4bit_model, saved_nf4_base
from test_lora_embeddings_peft import ours_in_peft, peft_here

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
    assert ours_in_peft(name, params4, cfg, bnb_4bit_model(path), tmp_path, f"NF4 {name}") < 1e-5


@pytest.mark.parametrize("name", NF4_CASES)
def test_peft_adapter_over_bitsandbytes_loads_here(base, name, tmp_path):
    cfg, params4, path = base
    err, _ = peft_here(name, params4, cfg, bnb_4bit_model(path), tmp_path, f"NF4 {name}")
    assert err < 1e-5
