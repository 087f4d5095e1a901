"""One reader and validator of adapter directories: every method refuses bad files alike."""

import json
import re

import jax
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

import jpeft
from jpeft.adapters import Adapter, LlamaAdapter


def _saved(tmp_path, method, params, cfg):
    jpeft.save_hf_adapter(tmp_path, method, method.init(jax.random.key(1), params, cfg), cfg)
    return tmp_path


def _edit_config(path, edit):
    config_path = path / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config_path.write_text(json.dumps(edit(config)))
    return str(config_path)


def _edit_tensors(path, edit):
    weights = path / "adapter_model.safetensors"
    save_file(edit(load_file(weights)), weights)
    return str(weights)


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda c: {**c, "r": "eight"}, r"'r' is 'eight' \(str\); expected int"),
        (lambda c: {**c, "lora_alpha": "sixteen"}, r"'lora_alpha' is 'sixteen' \(str\)"),
        (lambda c: {**c, "target_modules": [1]}, r"'target_modules' is \[1\].*list of str"),
        (lambda c: [c], "expected a JSON object, found list"),
    ],
)
def test_wrong_config_values_name_file_and_key(tmp_path, params, cfg, edit, message):
    path = _edit_config(_saved(tmp_path, jpeft.LoRA(r=2), params, cfg), edit)
    with pytest.raises(ValueError, match=message) as info:
        jpeft.load_hf_adapter(tmp_path, params, cfg)
    assert path in str(info.value)


def test_invalid_json_and_missing_keys(tmp_path, params, cfg):
    path = _saved(tmp_path, Adapter(bottleneck=4), params, cfg)
    config = (path / "adapter_config.json").read_text()
    (path / "adapter_config.json").write_text(config[:-5])
    with pytest.raises(ValueError, match=r"adapter_config\.json: not valid JSON"):
        jpeft.load_hf_adapter(path, params, cfg)
    (path / "adapter_config.json").write_text(config)
    _edit_config(path, lambda c: {k: v for k, v in c.items() if k != "bottleneck"})
    with pytest.raises(ValueError, match=r"adapter_config\.json: missing key 'bottleneck'"):
        jpeft.load_hf_adapter(path, params, cfg)


@pytest.mark.parametrize(
    "method",
    [
        jpeft.LoRA(r=2),
        Adapter(bottleneck=4, layers=(1,)),
        LlamaAdapter(adapter_len=3),
        jpeft.PromptTuning(num_virtual_tokens=3),
        jpeft.PrefixTuning(num_virtual_tokens=3),
        jpeft.MultitaskPromptTuning(num_virtual_tokens=3, num_tasks=2),
    ],
    ids=lambda m: type(m).__name__,
)
def test_every_method_refuses_bad_tensors_alike(tmp_path, params, cfg, method):
    path = _saved(tmp_path, method, params, cfg)
    original = load_file(path / "adapter_model.safetensors")
    name = sorted(original)[0]
    extra = _edit_tensors(path, lambda t: {**t, "unused.weight": np.zeros(2, np.float32)})
    with pytest.raises(ValueError, match=r"1 tensors are not used by its config.*unused\.weight"):
        jpeft.load_hf_adapter(path, params, cfg)
    wrong = _edit_tensors(path, lambda t: {**original, name: np.zeros((1, 1), np.float32)})
    expected = f"{name!r} has shape [1, 1], expected {list(original[name].shape)}"
    with pytest.raises(ValueError, match=re.escape(expected)):
        jpeft.load_hf_adapter(path, params, cfg)
    _edit_tensors(path, lambda t: {k: v for k, v in original.items() if k != name})
    with pytest.raises(ValueError, match=re.escape(f"missing tensor {name!r}")) as info:
        jpeft.load_hf_adapter(path, params, cfg)
    assert extra == wrong and extra in str(info.value)
