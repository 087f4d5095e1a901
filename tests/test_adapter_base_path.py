"""Saved adapters name their base by absolute path, so peft's AutoPeftModelForCausalLM loads
them from anywhere: from the API without an explicit base path, and from the CLI."""

from __future__ import annotations

import json
import os
from pathlib import Path

import jax
import numpy as np
import peft
import torch
from cli_utils import reference_run
from test_lora import forward, randomize

import jpeft
from jpeft import assets
from jpeft.models import hf
from jpeft.models.tokenizer import Tokenizer


def test_api_adapter_loads_with_auto_peft_model(tmp_path, monkeypatch):
    base = Path(assets.path("tiny-llama"))
    monkeypatch.chdir(base.parent)
    cfg, params = hf.load_pretrained(base.name)  # a relative directory
    assert cfg.name_or_path == str(base)
    method = jpeft.LoRA(r=4, alpha=8, targets=("q_proj", "v_proj"))
    params = randomize(method.init(jax.random.key(0), params, cfg))
    jpeft.save_hf_adapter(tmp_path / "adapter", method, params, cfg)  # no base path given
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(base)

    monkeypatch.chdir(tmp_path)
    model = peft.AutoPeftModelForCausalLM.from_pretrained(str(tmp_path / "adapter")).eval()
    ids = np.array([Tokenizer.from_dir(base).encode("Sort the digits: 3 1 2")], np.int32)
    with torch.no_grad():
        theirs = model(input_ids=torch.tensor(ids)).logits.numpy()
    ours = np.asarray(forward(params, cfg, ids))
    assert np.abs(ours - theirs).max() / np.abs(theirs).max() < 1e-5


def test_cli_adapter_names_its_base_absolutely():
    _, out = reference_run()
    config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    base = config["base_model_name_or_path"]
    assert os.path.isabs(base) and os.path.isfile(os.path.join(base, "config.json")), base
