"""Parity with transformers on tiny random checkpoints that transformers saved itself."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from jpeft.models import hf, llama
from jpeft.models.cache import KVCache

BASE = dict(
    vocab_size=97,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
    rms_norm_eps=1e-5,
)
LLAMA3 = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 32,
}


def _hf_checkpoint(path, dtype=torch.float32, **overrides) -> transformers.LlamaForCausalLM:
    """Save a random transformers LLaMA (norms and biases randomized too) in ``dtype``.

    Returns the fp32 transformers model holding exactly the saved values.
    """
    torch.manual_seed(0)
    config = transformers.LlamaConfig(**{**BASE, **overrides})
    model = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.normal_(1.0, 0.1)
            elif name.endswith("bias"):
                p.normal_(0.0, 0.02)
    if dtype == torch.float32:
        model.save_pretrained(path)
        return model
    model.to(dtype).save_pretrained(path)  # (.to also rounds the RoPE buffer: reload)
    return transformers.LlamaForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


_forward = jax.jit(llama.forward, static_argnums=1, static_argnames="remat")


@pytest.fixture(scope="module")
def gqa(tmp_path_factory):
    """The default GQA checkpoint: ``(transformers model, path, cfg, params)``."""
    path = tmp_path_factory.mktemp("gqa")
    model = _hf_checkpoint(path)
    return (model, path, *hf.load_pretrained(path))


def _reference(model, ids, mask=None, position_ids=None) -> np.ndarray:
    kwargs = {"attention_mask": None if mask is None else torch.tensor(mask)}
    if position_ids is not None:
        kwargs["position_ids"] = torch.tensor(position_ids)
    with torch.no_grad():
        return model(torch.tensor(ids), **kwargs).logits.numpy()


def _rel_err(out, ref, valid=None) -> float:
    out, ref = np.asarray(out, np.float32), np.asarray(ref, np.float32)
    if valid is not None:
        out, ref = out[valid.astype(bool)], ref[valid.astype(bool)]
    return float(np.abs(out - ref).max() / np.abs(ref).max())


def _ids(b: int, t: int, seed: int = 0) -> np.ndarray:
    return np.random.RandomState(seed).randint(0, BASE["vocab_size"], (b, t)).astype(np.int32)


def _padded(side: str) -> tuple[np.ndarray, np.ndarray]:
    """Three rows of 12 tokens with 0, 4 and 7 pads on ``side``."""
    mask = np.ones((3, 12), np.int32)
    for row, pads in ((1, 4), (2, 7)):
        if side == "left":
            mask[row, :pads] = 0
        else:
            mask[row, 12 - pads :] = 0
    return _ids(3, 12), mask


@pytest.mark.parametrize(
    "overrides",
    [
        dict(num_key_value_heads=4, attention_bias=True, mlp_bias=True),
        dict(num_key_value_heads=1, tie_word_embeddings=True),
        dict(head_dim=32, rope_scaling=LLAMA3),
        dict(rope_scaling={"rope_type": "linear", "factor": 2.0}),
    ],
    ids=["mha-bias", "mqa-tied", "head_dim-llama3", "linear"],
)
def test_logits_match_transformers(tmp_path, overrides):
    model = _hf_checkpoint(tmp_path, **overrides)
    cfg, params = hf.load_pretrained(tmp_path)
    assert ("lm_head" in params) != cfg.tie_word_embeddings
    ids = _ids(2, 40)
    assert _rel_err(_forward(params, cfg, ids), _reference(model, ids)) <= 1e-5


def test_gqa_logits_match_transformers(gqa):
    model, _, cfg, params = gqa
    ids = _ids(2, 40)
    assert _rel_err(_forward(params, cfg, ids), _reference(model, ids)) <= 1e-5


def test_dynamic_rope_within_and_beyond_max_positions(tmp_path):
    scaling = {"rope_type": "dynamic", "factor": 2.0}
    model = _hf_checkpoint(tmp_path, max_position_embeddings=16, rope_scaling=scaling)
    cfg, params = hf.load_pretrained(tmp_path)
    for t in (12, 40):  # transformers grows its tables statefully: short sequence first
        ids = _ids(2, t)
        assert _rel_err(_forward(params, cfg, ids), _reference(model, ids)) <= 1e-5, t


@pytest.mark.parametrize("side", ["right", "left"])
def test_padded_batch(gqa, side):
    model, _, cfg, params = gqa
    ids, mask = _padded(side)
    positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
    ref = _reference(model, ids, mask, positions if side == "left" else None)
    out = _forward(params, cfg, ids, attention_mask=mask)
    assert _rel_err(out, ref, mask) <= 1e-5


def test_bf16_checkpoint_and_params_with_fp32_compute(tmp_path):
    model = _hf_checkpoint(tmp_path, dtype=torch.bfloat16)
    ids = _ids(2, 40)
    ref = _reference(model, ids)
    cfg, params32 = hf.load_pretrained(tmp_path, dtype=jnp.float32)
    _, params16 = hf.load_pretrained(tmp_path, dtype=jnp.bfloat16)
    assert {a.dtype for a in jax.tree.leaves(params16)} == {jnp.dtype(jnp.bfloat16)}
    same = jax.tree.map(lambda a, b: bool(jnp.all(a.astype(jnp.float32) == b)), params16, params32)
    assert all(jax.tree.leaves(same))
    for params in (params32, params16):
        out = _forward(params, cfg, ids)
        assert out.dtype == jnp.float32
        assert _rel_err(out, ref) <= 1e-5


def test_remat_policies_give_identical_logits_and_close_gradients(gqa):
    _, _, cfg, params = gqa
    ids = _ids(2, 40)
    logits = {remat: _forward(params, cfg, ids, remat=remat) for remat in llama.REMAT_POLICIES}
    for remat in logits:
        np.testing.assert_array_equal(logits[remat], logits["none"])
    loss = lambda p, remat: jnp.mean(llama.forward(p, cfg, ids, remat=remat) ** 2)
    grad_fn = jax.jit(jax.grad(loss), static_argnums=1)
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7),
        grad_fn(params, "full"),
        grad_fn(params, "none"),
    )


@pytest.mark.parametrize("side", ["none", "left"])
def test_cached_decode_equals_full_forward(gqa, side):
    _, _, cfg, params = gqa
    ids, mask = _padded("left")
    if side == "none":
        mask = np.ones_like(mask)
    full = _forward(params, cfg, ids, attention_mask=mask)
    prefill = 8
    cache = KVCache.create(cfg, batch_size=ids.shape[0], max_len=ids.shape[1])
    logits, cache = _forward(
        params, cfg, ids[:, :prefill], attention_mask=mask[:, :prefill], cache=cache
    )
    pieces = [logits]
    for t in range(prefill, ids.shape[1]):
        step = slice(t, t + 1)
        logits, cache = _forward(
            params, cfg, ids[:, step], attention_mask=mask[:, step], cache=cache
        )
        pieces.append(logits)
    assert _rel_err(jnp.concatenate(pieces, axis=1), full, mask) <= 1e-5


@pytest.mark.parametrize(
    ("edit", "field"),
    [
        ({"hidden_act": "gelu"}, "hidden_act"),
        ({"rope_parameters": {"rope_type": "yarn", "factor": 2.0}}, "rope_type"),
        ({"rope_scaling": {"rope_type": "ntk-by-parts", "factor": 2.0}}, "rope_type"),
        ({"sliding_window": 4096}, "sliding_window"),
    ],
    ids=["hidden_act", "rope_parameters", "rope_scaling", "unknown_field"],
)
def test_unsupported_config_names_the_field(gqa, tmp_path, edit, field):
    raw = json.loads((gqa[1] / "config.json").read_text())
    raw.pop("rope_parameters", None)
    (tmp_path / "config.json").write_text(json.dumps({**raw, **edit}))
    with pytest.raises(ValueError, match=field):
        hf.load_pretrained(tmp_path)
