"""Shared fixtures: tiny random LLaMA configs and their transformers twins."""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys
from unittest import mock

import jax
import numpy as np
import pytest
import torch
import transformers

from jpeft.models import llama
from jpeft.models.config import LlamaConfig
from jpeft.models.hf_names import hf_state_dict

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


def next_token_loss(params, cfg: LlamaConfig, ids, mask=None):
    """Mean next-token cross-entropy over valid targets (a plain reference, not train_step)."""
    import jax.numpy as jnp

    mask = jnp.ones(ids.shape, jnp.int32) if mask is None else mask
    logits = llama.forward(params, cfg, ids, attention_mask=mask)[:, :-1]
    logp = jax.nn.log_softmax(logits.astype(jnp.float32))
    picked = jnp.take_along_axis(logp, ids[:, 1:, None], axis=-1)[..., 0]
    weights = mask[:, 1:].astype(jnp.float32)
    return -jnp.sum(picked * weights) / jnp.sum(weights)


def sgd_train(params, cfg: LlamaConfig, ids, steps: int = 10, lr: float = 0.1):
    """Plain SGD on the trainable partition; returns (params, [losses])."""
    import jpeft

    trainable, frozen = jpeft.split(params)
    loss_fn = jax.jit(
        jax.value_and_grad(lambda t: next_token_loss(jpeft.combine(t, frozen), cfg, ids))
    )
    losses = []
    for _ in range(steps):
        loss, grads = loss_fn(trainable)
        losses.append(float(loss))
        trainable = jax.tree.map(lambda p, g: p - lr * g, trainable, grads)
    return jpeft.combine(trainable, frozen), losses


def saved_nf4_base(tmp_path_factory, **overrides) -> tuple[LlamaConfig, dict, pathlib.Path]:
    """``(cfg, fp32 params, HF directory)`` of a tiny model whose linears NF4 can hold.

    Every input width is a multiple of 64 (the NF4 block size of jpeft's kernel layout);
    ``overrides`` change other config fields (``tie_word_embeddings=True``...).
    """
    cfg = tiny_config(hidden_size=64, intermediate_size=128, **overrides)
    params = llama.init_params(jax.random.key(0), cfg)
    path = tmp_path_factory.mktemp("base")
    hf_twin(params, cfg).save_pretrained(path)
    return cfg, params, path


def bnb_4bit_model(
    path, quant_type: str = "nf4", double_quant: bool = True, blocksize: int = 64, **config
) -> transformers.LlamaForCausalLM:
    """transformers + bitsandbytes 4-bit (CPU, fp32 compute) from an HF directory, eval mode.

    ``BitsAndBytesConfig`` has no blocksize option; bitsandbytes' ``Params4bit`` takes one,
    and transformers carries a ``Linear4bit`` weight's own attributes into the quantized
    parameter, so other blocksizes are set on each new ``Linear4bit``'s weight.
    """
    bnb = transformers.BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=quant_type,
        bnb_4bit_use_double_quant=double_quant,
        bnb_4bit_compute_dtype=torch.float32,
        **config,
    )
    import bitsandbytes

    init = bitsandbytes.nn.Linear4bit.__init__

    def init_with_blocksize(self, *args, **kwargs):
        init(self, *args, **kwargs)
        self.weight.blocksize = blocksize

    with mock.patch.object(bitsandbytes.nn.Linear4bit, "__init__", init_with_blocksize):
        return transformers.LlamaForCausalLM.from_pretrained(
            path, quantization_config=bnb, device_map="cpu", dtype=torch.float32
        ).eval()


def run_on_cpu_devices(script: str, devices: int = 8) -> str:
    """stdout of ``python script`` run with ``devices`` CPU devices; fails on a non-zero exit.

    The rest of the suite keeps one device (XLA fixes the count when the backend starts).
    """
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run(
        [sys.executable, os.path.abspath(script)],
        env=env,
        cwd=root,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc.stdout


# The jpeft command's persistent compilation cache stays off in tests unless a test asks
# (tests/test_compilation_cache.py): nothing is written under the user's ~/.cache.
os.environ.setdefault("JPEFT_COMPILATION_CACHE", "none")
