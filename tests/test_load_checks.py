"""What loading refuses, and how it says so: bad byte ranges, NaN/Inf, integer weights,
config.json syntax and types, symlink loops (issue #17 items 4 and 10)."""

from __future__ import annotations

import json
import os
import re
import struct

import jax
import ml_dtypes
import numpy as np
import pytest
import safetensors.numpy
import safetensors.torch
import torch
from conftest import tiny_config

import jpeft
from jpeft.lora.method import load_adapter
from jpeft.models import hf, llama
from jpeft.models.safetensors_io import SafetensorsFile

DOWN1 = "model.layers.1.mlp.down_proj.weight"


def _save_base(path, cfg=None):
    """A tiny random fp32 HF LLaMA directory (numpy weights: nothing compiles)."""
    cfg = cfg or tiny_config()
    rs = np.random.RandomState(0)
    shapes = jax.eval_shape(lambda: llama.init_params(jax.random.key(0), cfg))
    params = jax.tree.map(lambda s: rs.normal(0, 0.02, s.shape).astype(np.float32), shapes)
    hf.save_pretrained(path, cfg, params)
    return cfg, params


def _edit_tensors(file, edit) -> None:
    tensors = safetensors.numpy.load_file(file)
    edit(tensors)
    safetensors.numpy.save_file(tensors, file, metadata={"format": "pt"})


def _set(key, index, value):
    def edit(tensors):
        tensors[key] = tensors[key].copy()
        tensors[key][index] = value

    return edit


def _write_raw(path, tensors, shared):
    """A safetensors file whose header gives ``shared[b] = a``: b reuses a's byte range."""
    header, data = {}, b""
    for key, array in tensors.items():
        if key in shared:
            continue
        header[key] = {
            "dtype": "F32",
            "shape": list(array.shape),
            "data_offsets": [len(data), len(data) + array.nbytes],
        }
        data += array.astype("<f4").tobytes()
    for key, source in shared.items():
        header[key] = {**header[source], "shape": list(tensors[key].shape)}
    blob = json.dumps(header).encode()
    blob += b" " * (-len(blob) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)) + blob + data)


def test_a_byte_range_shared_by_two_tensors_is_refused(tmp_path):
    """Before: layer 1's norm silently loaded as a copy of layer 0's."""
    _save_base(tmp_path)
    file = tmp_path / "model.safetensors"
    tensors = safetensors.numpy.load_file(file)
    norm0, norm1 = (f"model.layers.{i}.input_layernorm.weight" for i in (0, 1))
    _write_raw(file, tensors, shared={norm1: norm0})
    with pytest.raises(ValueError, match=r"model\.safetensors: corrupt .*invalid offset"):
        hf.load_pretrained(tmp_path)


def test_bf16_reads_by_row_ranges_through_the_library(tmp_path):
    weight = torch.arange(24, dtype=torch.bfloat16).reshape(6, 4)
    safetensors.torch.save_file({"w": weight}, tmp_path / "w.safetensors")
    with SafetensorsFile(tmp_path / "w.safetensors") as f:
        rows = f.read("w", 2, 5)
        assert f.dtype("w") == rows.dtype == np.dtype(ml_dtypes.bfloat16)
        np.testing.assert_array_equal(rows.astype(np.float32), weight[2:5].float().numpy())
        assert f.read("w", 3, 3).shape == (0, 4)
        with pytest.raises(ValueError, match=r"rows \[4, 7\) of 'w'"):
            f.read("w", 4, 7)


def test_a_type_numpy_cannot_hold_is_named(tmp_path):
    fp8 = torch.zeros(2, 2, dtype=torch.float8_e4m3fn)
    safetensors.torch.save_file({"w": fp8}, tmp_path / "w.safetensors")
    with (
        SafetensorsFile(tmp_path / "w.safetensors") as f,
        pytest.raises(ValueError, match=r"w\.safetensors: cannot read tensor 'w' of type F8_E4M3"),
    ):
        f.read("w")


@pytest.mark.parametrize(
    ("key", "index", "value", "counts"),
    [
        (DOWN1, (5, 9), np.nan, r"1 NaN, 0 Inf; the first at index \[5, 9\]"),
        ("model.norm.weight", (3,), -np.inf, r"0 NaN, 1 Inf; the first at index \[3\]"),
    ],
    ids=["nan", "inf"],
)
def test_a_nonfinite_base_weight_is_refused_naming_it(
    tmp_path, monkeypatch, key, index, value, counts
):
    """Before: it loaded, and training stopped at step 1 with 'the loss is nan'."""
    _save_base(tmp_path)
    _edit_tensors(tmp_path / "model.safetensors", _set(key, index, value))
    monkeypatch.setattr(hf, "CHUNK_BYTES", 512)  # several chunks: the index is the tensor's
    message = rf"model\.safetensors: tensor '{re.escape(key)}' holds non-finite values \({counts}"
    with pytest.raises(ValueError, match=message + r".*allow_nonfinite=True"):
        hf.load_pretrained(tmp_path)
    _, params = hf.load_pretrained(tmp_path, allow_nonfinite=True)
    assert not all(np.isfinite(leaf).all() for leaf in jax.tree.leaves(params))


def test_nonfinite_checks_leave_host_memory_streaming(tmp_path, monkeypatch):
    """The check runs on the device: a bad chunk is named without reading the whole tensor."""
    _save_base(tmp_path)
    _edit_tensors(tmp_path / "model.safetensors", _set(DOWN1, (30, 0), np.nan))
    monkeypatch.setattr(hf, "CHUNK_BYTES", 256)  # one 64-wide fp32 row per read
    reads = []
    original = SafetensorsFile.read

    def read(self, key, start=0, stop=None):
        reads.append((key, start, stop))
        return original(self, key, start, stop)

    monkeypatch.setattr(SafetensorsFile, "read", read)
    with pytest.raises(ValueError, match=r"index \[30, 0\]"):
        hf.load_pretrained(tmp_path)
    assert reads[-2:] == [(DOWN1, 30, 31)] * 2  # copied, then read again to be named


@pytest.fixture
def adapter(tmp_path):
    cfg, params = _save_base(tmp_path / "base")
    method = jpeft.LoRA(r=2, targets=("q_proj", "v_proj"))
    adapted = method.init(jax.random.key(0), jax.tree.map(np.asarray, params), cfg)
    jpeft.save_hf_adapter(tmp_path / "adapter", method, adapted, cfg)
    return tmp_path / "adapter", params, cfg


LORA_B = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"


def test_a_nonfinite_adapter_tensor_is_refused_naming_it(adapter):
    """Before: loss nan, an empty generation and a NaN merged export, all with exit code 0."""
    path, params, cfg = adapter
    _edit_tensors(path / "adapter_model.safetensors", _set(LORA_B, (0, 1), np.inf))
    message = rf"adapter_model\.safetensors: tensor '{LORA_B}' holds non-finite values"
    with pytest.raises(ValueError, match=message):
        jpeft.load_hf_adapter(path, params, cfg)
    with pytest.raises(ValueError, match=message):
        load_adapter(path, params, cfg, "a")
    jpeft.load_hf_adapter(path, params, cfg, allow_nonfinite=True)
    load_adapter(path, params, cfg, "a", allow_nonfinite=True)


def test_an_integer_adapter_tensor_is_refused(adapter):
    """Before: int32 tensors were cast to float and the adapter became a no-op."""
    path, params, cfg = adapter

    def to_int(tensors):
        tensors[LORA_B] = tensors[LORA_B].astype(np.int32)

    _edit_tensors(path / "adapter_model.safetensors", to_int)
    message = rf"tensor '{LORA_B}' has dtype int32; expected a floating-point weight"
    with pytest.raises(ValueError, match=message):
        jpeft.load_hf_adapter(path, params, cfg)


def _config_edit(path, text):
    (path / "config.json").write_text(text)
    with pytest.raises(ValueError) as info:
        hf.load_pretrained(path)
    return str(info.value)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda raw: json.dumps(raw)[:-1] + ",}", r"config\.json: not valid JSON: .*\(line 1"),
        (lambda raw: json.dumps([raw]), r"config\.json: expected a JSON object .*, found a list"),
        (
            lambda raw: json.dumps({**raw, "hidden_size": "32"}),
            r"config\.json: hidden_size='32' is a str; expected int",
        ),
        (
            lambda raw: json.dumps({**raw, "num_hidden_layers": True}),
            r"config\.json: num_hidden_layers=True is a bool; expected int",
        ),
        (
            lambda raw: json.dumps({**raw, "rms_norm_eps": None}),
            r"config\.json: rms_norm_eps=None is null; expected float",
        ),
        (
            lambda raw: json.dumps({**raw, "eos_token_id": [2, "3"]}),
            r"eos_token_id=\[2, '3'\] is a list; expected int or a list of int or null",
        ),
        (
            lambda raw: json.dumps({**raw, "num_key_value_heads": 0}),
            r"config\.json: num_key_value_heads=0 must be a positive number",
        ),
        (
            lambda raw: json.dumps({**raw, "rope_scaling": {"rope_type": "linear", "factor": "2"}}),
            r"config\.json: rope_scaling\.factor='2' is a str; expected float",
        ),
        (
            lambda raw: json.dumps({**raw, "rope_parameters": [10000.0]}),
            r"config\.json: rope_parameters=\[10000\.0\] is a list; expected an object",
        ),
    ],
    ids=[
        "syntax",
        "list",
        "str_for_int",
        "bool_for_int",
        "null_for_float",
        "eos_list",
        "zero_heads",
        "rope_factor",
        "rope_parameters",
    ],
)
def test_config_json_errors_name_the_file_key_and_value(tmp_path, edit, message):
    """Before: a JSON error without the file, or a TypeError traceback."""
    _save_base(tmp_path)
    raw = json.loads((tmp_path / "config.json").read_text())
    text = _config_edit(tmp_path, edit(raw))
    assert text.startswith(str(tmp_path / "config.json")), text
    assert re.search(message, text), text


def test_a_float_given_as_an_int_is_a_float(tmp_path):
    _save_base(tmp_path)
    raw = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**raw, "rope_theta": 500000}))
    loaded, _ = hf.load_pretrained(tmp_path)
    assert loaded.rope_theta == 500000.0 and isinstance(loaded.rope_theta, float)


@pytest.mark.parametrize("name", ["model.safetensors", "config.json"])
def test_a_symlink_loop_is_named_as_one(tmp_path, name):
    """Before: 'no model.safetensors' (and 'no config.json') for a file that is a loop."""
    _save_base(tmp_path)
    os.remove(tmp_path / name)
    os.symlink(name, tmp_path / name)
    with pytest.raises(ValueError, match=rf"{re.escape(name)}: cannot open it: a symlink loop"):
        hf.load_pretrained(tmp_path)


def test_a_dangling_symlink_names_its_target(tmp_path):
    _save_base(tmp_path)
    os.remove(tmp_path / "model.safetensors")
    os.symlink("/nowhere/model.safetensors", tmp_path / "model.safetensors")
    message = r"model\.safetensors: a symlink to '/nowhere/model\.safetensors', which does not"
    with pytest.raises(FileNotFoundError, match=message):
        hf.load_pretrained(tmp_path)
