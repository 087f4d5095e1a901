"""Shared fixtures: tiny random LLaMA configs and their transformers twins."""

from __future__ import annotations

import jax
import numpy as np
import pytest
import torch
import transformers

from models import llama
from models.config import LlamaConfig
from models.hf_names import hf_state_dict

torch.manual_seed(0)


def tiny_config(**overrides) -> LlamaConfig:
    """A 2-layer GQA LLaMA small enough for CPU parity tests."""
    base = dict(
        vocab_size=97,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        rms_norm_eps=1e-5,
    )
    base.update(overrides)
    return LlamaConfig(**base)


def hf_twin(params, cfg: LlamaConfig) -> transformers.LlamaForCausalLM:
    """transformers' LlamaForCausalLM (fp32, eval mode) holding exactly ``params``."""
    raw = {k: v for k, v in cfg.to_hf().items() if k not in ("architectures", "model_type")}
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**raw)).eval()
    state = {k: torch.from_numpy(v.copy()) for k, v in hf_state_dict(params, cfg).items()}
    model.load_state_dict(state, strict=not cfg.tie_word_embeddings)
    return model


@pytest.fixture
def cfg() -> LlamaConfig:
    return tiny_config()


@pytest.fixture
def params(cfg):
    return llama.init_params(jax.random.key(0), cfg)


@pytest.fixture
def batch(cfg):
    """Token ids ``[2, 9]`` with a right-padded second row."""
    rs = np.random.RandomState(0)
    ids = rs.randint(0, cfg.vocab_size, (2, 9)).astype(np.int32)
    mask = np.ones((2, 9), np.int32)
    mask[1, 6:] = 0
    return ids, mask
