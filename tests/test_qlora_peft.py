"""QLoRA adapters move between jpeft and peft over transformers + bitsandbytes, both ways.

One fp32 checkpoint, loaded as NF4 + double quantization by both sides (bitsandbytes
on CPU with fp32 compute, ``hf.load_pretrained(quantize="nf4")`` here). A QLoRA
adapter is a plain peft LoRA adapter, so the files are the same in both directions.
The merged export is a dense checkpoint that plain transformers loads.
"""

import jax
import numpy as np
import peft
import pytest
import torch
import transformers
from bitsandbytes.nn import Linear4bit
from conftest import bnb_4bit_model, saved_nf4_base
from test_lora import forward, randomize
from test_lora_peft import assert_close, peft_logits

import jpeft
from jpeft.lora import LoRAWeight
from jpeft.models import hf
from jpeft.models.hf_names import PROJECTIONS, group_of
from jpeft.quant import QuantizedWeight


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """(cfg, our NF4 params, the fp32 checkpoint dir, ids [2, 9], mask with a right-padded row)."""
    cfg, _, path = saved_nf4_base(tmp_path_factory)
    _, params4 = hf.load_pretrained(path, quantize="nf4")
    rs = np.random.RandomState(0)
    ids = rs.randint(0, cfg.vocab_size, (2, 9)).astype(np.int32)
    mask = np.ones((2, 9), np.int32)
    mask[1, 6:] = 0
    return cfg, params4, path, ids, mask


def bnb_model(path):
    model = bnb_4bit_model(path)
    assert isinstance(model.model.layers[0].mlp.down_proj, Linear4bit)
    return model


def kernels(params):
    return [params["layers"][group_of(m)][m]["kernel"] for m in PROJECTIONS]


@pytest.fixture(scope="module")
def ours(setup):
    """A jpeft QLoRA tree (all linears, random nonzero B) over the NF4-loaded params."""
    cfg, params4, _, _, _ = setup
    method = jpeft.QLoRA(r=4, alpha=8, targets="all-linear")
    adapted = randomize(method.init(jax.random.key(1), params4, cfg))
    for kernel, base in zip(kernels(adapted), kernels(params4), strict=True):
        assert isinstance(kernel, LoRAWeight) and kernel.base is base  # kept, not re-quantized
    return method, adapted


def test_peft_qlora_adapter_loads_over_our_nf4_base(setup, tmp_path):
    cfg, params4, path, ids, mask = setup
    config = peft.LoraConfig(
        r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False
    )
    torch.manual_seed(0)
    model = peft.get_peft_model(bnb_model(path), config).eval()
    assert isinstance(
        model.base_model.model.model.layers[1].self_attn.q_proj, peft.tuners.lora.bnb.Linear4bit
    )
    model.save_pretrained(tmp_path)
    method, loaded = jpeft.load_hf_adapter(tmp_path, params4, cfg)
    # over a 4-bit model peft writes all-linear as the full module names it found
    assert (type(method), method.r, method.alpha) == (jpeft.LoRA, 4, 8)
    for kernel in kernels(loaded):
        assert isinstance(kernel, LoRAWeight) and isinstance(kernel.base, QuantizedWeight)
        assert np.abs(np.asarray(kernel.adapters[0].b)).max() > 0
    assert_close(
        forward(loaded, cfg, ids, attention_mask=mask), peft_logits(model, ids, mask), mask
    )


def test_our_qlora_adapter_loads_in_peft_over_bitsandbytes(setup, ours, tmp_path):
    cfg, _, path, ids, mask = setup
    method, adapted = ours
    jpeft.save_hf_adapter(tmp_path, method, adapted, cfg)
    model = peft.PeftModel.from_pretrained(bnb_model(path), tmp_path).eval()
    out = forward(adapted, cfg, ids, attention_mask=mask)
    assert_close(out, peft_logits(model, ids, mask), mask)


@pytest.mark.parametrize("dtype, rtol", [("float32", 1e-5), ("bfloat16", 2e-2)])
def test_merged_qlora_export_loads_in_plain_transformers(setup, ours, tmp_path, dtype, rtol):
    """The merged tree is dense (dequantized base + LoRA delta): no bitsandbytes needed."""
    cfg, _, _, ids, mask = setup
    _, adapted = ours
    merged = jpeft.merge(adapted)
    assert not any(isinstance(k, jpeft.Node) for k in kernels(merged))
    hf.save_pretrained(tmp_path, cfg, merged, dtype=dtype)
    model = transformers.LlamaForCausalLM.from_pretrained(tmp_path, dtype="auto").eval()
    assert getattr(model.config, "quantization_config", None) is None
    assert type(model.model.layers[0].mlp.down_proj) is torch.nn.Linear
    assert model.model.layers[0].mlp.down_proj.weight.dtype == getattr(torch, dtype)
    with torch.no_grad():
        ref = model.float()(torch.tensor(ids), attention_mask=torch.tensor(mask)).logits.numpy()
    out = np.asarray(forward(adapted, cfg, ids, attention_mask=mask))
    valid = mask.astype(bool)
    err = np.abs(out - ref)[valid].max() / np.abs(ref[valid]).max()
    assert err < rtol, err
