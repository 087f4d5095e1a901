"""LoRA adapters move between HF peft and jpeft with the same logits, both ways."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import peft
import pytest
import torch
from conftest import hf_twin
from test_lora import forward, project, randomize

import jpeft
from jpeft.lora import LoRA, LoRAAdapter, LoRAWeight
from jpeft.lora.peft_io import options
from jpeft.models.hf_names import hf_state_dict

CASES = {
    "plain": {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"]},
    "rslora_layers": {
        "r": 4,
        "lora_alpha": 8,
        "use_rslora": True,
        "target_modules": ["k_proj", "o_proj", "up_proj"],
        "layers_to_transform": [1],
    },
    "patterns": {
        "r": 4,
        "lora_alpha": 8,
        "target_modules": ["q_proj", "v_proj", "down_proj"],
        "rank_pattern": {"v_proj": 2, r"layers\.1\.self_attn\.q_proj": 3},
        "alpha_pattern": {"down_proj": 3, "model.layers.0.self_attn.v_proj": 5},
    },
    "dora_all_linear": {"r": 4, "lora_alpha": 8, "target_modules": "all-linear", "use_dora": True},
}


def randomize_peft(model, seed=0):
    """Random lora_B (and scaled DoRA magnitudes) so the peft adapter is not a no-op."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(0.3 * torch.randn(p.shape, generator=gen))
            elif "lora_magnitude_vector" in name:
                p.mul_(1 + 0.2 * torch.randn(p.shape, generator=gen))


def peft_logits(model, ids, mask):
    with torch.no_grad():
        out = model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask))
    return out.logits.numpy()


def assert_close(out, ref, mask):
    valid = mask.astype(bool)
    err = np.abs(np.asarray(out) - ref)[valid].max() / np.abs(ref[valid]).max()
    assert err < 1e-5, err


@pytest.mark.parametrize("case", CASES)
def test_peft_adapter_loads_with_equal_logits(params, cfg, batch, tmp_path, case):
    ids, mask = batch
    model = peft.get_peft_model(hf_twin(params, cfg), peft.LoraConfig(**CASES[case])).eval()
    randomize_peft(model)
    model.save_pretrained(tmp_path)
    method, ours = jpeft.load_hf_adapter(tmp_path, params, cfg)
    assert method.use_dora == CASES[case].get("use_dora", False)
    out = forward(ours, cfg, ids, attention_mask=mask)
    assert_close(out, peft_logits(model, ids, mask), mask)


@pytest.mark.parametrize("case", CASES)
def test_our_adapter_loads_in_peft_with_equal_logits(params, cfg, batch, tmp_path, case):
    ids, mask = batch
    method = LoRA(**options(peft.LoraConfig(**CASES[case]).to_dict()))
    ours = randomize(method.init(jax.random.key(1), params, cfg))
    jpeft.save_hf_adapter(tmp_path, method, ours, cfg)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["target_modules"] == sorted(config["target_modules"])
    model = peft.PeftModel.from_pretrained(hf_twin(params, cfg), tmp_path).eval()
    out = forward(ours, cfg, ids, attention_mask=mask)
    assert_close(out, peft_logits(model, ids, mask), mask)
    if method.use_dora:  # merging folds DoRA the way peft's merge_and_unload does
        ref = {k: v.numpy() for k, v in model.merge_and_unload().state_dict().items()}
        for key, value in hf_state_dict(jpeft.merge(ours), cfg).items():
            np.testing.assert_allclose(value, ref[key], rtol=1e-5, atol=1e-6, err_msg=key)


def test_layers_to_transform_writes_only_those_layers(params, cfg):
    method = LoRA(r=4, targets=("q_proj", "up_proj"), layers_to_transform=(1,), use_dora=True)
    tensors = method.adapter_tensors(method.init(jax.random.key(1), params, cfg), cfg)
    assert len(tensors) == 6 and all(".layers.1." in k for k in tensors)


def _saved(params, cfg, tmp_path, **config):
    model = peft.get_peft_model(hf_twin(params, cfg), peft.LoraConfig(r=2, **config))
    model.save_pretrained(tmp_path)
    return json.loads((tmp_path / "adapter_config.json").read_text())


def test_unsupported_peft_settings_raise(params, cfg, tmp_path):
    _saved(params, cfg, tmp_path, target_modules=["v_proj"], modules_to_save=["q_proj"])
    with pytest.raises(ValueError, match="modules_to_save"):
        jpeft.load_hf_adapter(tmp_path, params, cfg)


def test_unknown_peft_target_raises_with_valid_names(params, cfg, tmp_path):
    config = _saved(params, cfg, tmp_path, target_modules=["q_proj"])
    config["target_modules"] = ["q_proj", "query_key_value"]
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"query_key_value.*valid names.*'v_proj'"):
        jpeft.load_hf_adapter(tmp_path, params, cfg)


def test_tensors_the_config_does_not_use_raise(params, cfg, tmp_path):
    config = _saved(params, cfg, tmp_path, target_modules=["q_proj", "v_proj"])
    config["target_modules"] = ["q_proj"]
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="not used by its config"):
        jpeft.load_hf_adapter(tmp_path, params, cfg)


class _Proj(torch.nn.Module):
    def __init__(self, fan_in, fan_out):
        super().__init__()
        self.q_proj = torch.nn.Linear(fan_in, fan_out, bias=False)

    def forward(self, x):
        return self.q_proj(x)


@pytest.mark.parametrize("use_dora", [False, True])
def test_gradients_match_peft(use_dora):
    """peft detaches DoRA's weight norm; so do we, so the gradients agree too."""
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"], use_dora=use_dora)
    model = peft.get_peft_model(_Proj(32, 16), config)
    randomize_peft(model)
    layer = model.base_model.model.q_proj
    x = torch.randn(3, 5, 32, generator=torch.Generator().manual_seed(1))
    cotangent = torch.randn(3, 5, 16, generator=torch.Generator().manual_seed(2))
    (model(x) * cotangent).sum().backward()
    ref = {"a": layer.lora_A["default"].weight, "b": layer.lora_B["default"].weight}
    if use_dora:
        ref["magnitude"] = layer.lora_magnitude_vector["default"].weight
    numpy = lambda t: t.detach().numpy()
    ours = LoRAAdapter(
        a=numpy(ref["a"]).T,
        b=numpy(ref["b"]).T,
        scaling=np.float32(2.0),
        magnitude=numpy(ref["magnitude"]) if use_dora else None,
        name="default",
        index=0,
        dropout=0.0,
    )
    base = numpy(layer.base_layer.weight).T
    loss = lambda ad: jnp.sum(project(LoRAWeight(base, (ad,)), numpy(x)) * numpy(cotangent))
    grads = jax.grad(loss)(ours)
    for field, p in ref.items():
        got = np.asarray(getattr(grads, field))
        np.testing.assert_allclose(got.T if field in "ab" else got, p.grad.numpy(), atol=1e-5)
