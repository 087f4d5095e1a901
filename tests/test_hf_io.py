"""HF checkpoint I/O: round trips, transformers as the reader, and clear errors on bad files."""

from __future__ import annotations

import json
import os
import re
import tracemalloc

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy
import torch
import transformers
from conftest import tiny_config

from jpeft.models import hf, llama
from jpeft.models.config import RopeScaling
from jpeft.models.linear import dense, matmul
from jpeft.nodes import Node, node


@node()
class _Halves(Node):
    """A test weight node standing for ``a + b``."""

    a: jax.Array
    b: jax.Array


@dense.register(_Halves)
def _(w: _Halves) -> jax.Array:
    return w.a + w.b


@matmul.register(_Halves)
def _(w: _Halves, x, ctx, name):
    return matmul(dense(w), x, ctx, name)


LLAMA3 = RopeScaling("llama3", 8.0, 1.0, 4.0, original_max_position_embeddings=16)


def _params(cfg, dtype=jnp.float32):
    """Random params drawn with numpy (no per-shape compiles, unlike jax.random)."""
    rs = np.random.RandomState(0)
    shapes = jax.eval_shape(lambda: llama.init_params(jax.random.key(0), cfg))
    return jax.tree.map(lambda s: jnp.asarray(rs.normal(0, 0.02, s.shape), dtype), shapes)


def _assert_same(a, b) -> None:
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        assert x.dtype == y.dtype
        np.testing.assert_array_equal(np.asarray(x, np.float32), np.asarray(y, np.float32))


_forward = jax.jit(llama.forward, static_argnums=1)


def _logits(params, cfg, ids):
    return np.asarray(_forward(params, cfg, jnp.asarray(ids)))


def _saved(tmp_path, cfg=None, **kwargs):
    cfg = cfg or tiny_config()
    params = _params(cfg)
    hf.save_pretrained(tmp_path, cfg, params, **kwargs)
    return cfg, params


@pytest.mark.parametrize(
    ("dtype", "shard"),
    [(jnp.float32, None), (jnp.bfloat16, 20_000)],
    ids=["fp32-single", "bf16-sharded"],
)
def test_round_trip_is_exact(tmp_path, dtype, shard):
    cfg = tiny_config(attention_bias=True, mlp_bias=True, rope_scaling=LLAMA3)
    params = _params(cfg, dtype)
    hf.save_pretrained(tmp_path, cfg, params, max_shard_size=shard or "5GB")
    files = [n for n in os.listdir(tmp_path) if n.endswith(".safetensors")]
    if shard:
        index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
        assert sorted(set(index["weight_map"].values())) == sorted(files)
        assert len(files) > 1
    else:
        assert files == ["model.safetensors"]
    loaded_cfg, loaded = hf.load_pretrained(tmp_path, dtype=dtype)
    assert loaded_cfg == cfg
    _assert_same(loaded, params)


def test_save_casts_to_dtype(tmp_path):
    _, params = _saved(tmp_path, dtype=jnp.bfloat16)
    assert json.loads((tmp_path / "config.json").read_text())["dtype"] == "bfloat16"
    _, loaded = hf.load_pretrained(tmp_path, dtype=jnp.float32)
    _assert_same(loaded, jax.tree.map(lambda a: a.astype(jnp.bfloat16).astype(a.dtype), params))


@pytest.mark.parametrize("shard", [None, 20_000], ids=["single", "sharded"])
def test_transformers_loads_our_save(tmp_path, shard):
    cfg, params = _saved(
        tmp_path, tiny_config(tie_word_embeddings=True), max_shard_size=shard or 10**9
    )
    model = transformers.LlamaForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    ids = np.random.RandomState(0).randint(0, cfg.vocab_size, (2, 40))
    with torch.no_grad():
        ref = model(torch.tensor(ids)).logits.numpy()
    out = _logits(params, cfg, ids)
    assert np.abs(out - ref).max() / np.abs(ref).max() <= 1e-5


def test_peft_nodes_are_folded_and_unmergeable_entries_refused(tmp_path):
    cfg = tiny_config()
    params = _params(cfg)
    base = params["layers"]["self_attn"]["q_proj"]["kernel"]
    params["layers"]["self_attn"]["q_proj"]["kernel"] = _Halves(base, base * 2)
    hf.save_pretrained(tmp_path, cfg, params)
    _, loaded = hf.load_pretrained(tmp_path)
    np.testing.assert_array_equal(loaded["layers"]["self_attn"]["q_proj"]["kernel"], base * 3)
    with pytest.raises(ValueError, match="prompt"):
        hf.save_pretrained(tmp_path, cfg, {**params, "prompt": jnp.zeros((4, 32))})
    with pytest.raises(ValueError, match="bias"):
        hf.save_pretrained(tmp_path, tiny_config(mlp_bias=True), params)


def test_resave_replaces_stale_shards_and_leaves_no_temp_files(tmp_path):
    _saved(tmp_path, max_shard_size=20_000)
    _saved(tmp_path)
    assert sorted(os.listdir(tmp_path)) == ["config.json", "model.safetensors"]


def test_tokenizer_files_are_copied(tmp_path):
    src = tmp_path / "tok"
    src.mkdir()
    (src / "tokenizer.json").write_text('{"version": "1.0"}')
    (src / "tokenizer_config.json").write_text('{"bos_token": "<s>"}')
    _saved(tmp_path / "out", tokenizer_dir=src)
    _saved(src, tokenizer_dir=src)  # saving into the tokenizer's own directory
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (tmp_path / "out" / name).read_text() == (src / name).read_text()
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=r"holds none of \['tokenizer\.json'"):
        _saved(tmp_path / "out2", tokenizer_dir=tmp_path / "empty")
    with pytest.raises(ValueError, match="max_shard_size"):
        _saved(tmp_path / "out3", max_shard_size="5 parsecs")


def _rewrite(path, edit) -> None:
    """Apply ``edit(dict of numpy tensors)`` to ``path/model.safetensors`` (fp32)."""
    tensors = safetensors.numpy.load_file(path / "model.safetensors")
    edit(tensors)
    safetensors.numpy.save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})


Q0 = "model.layers.0.self_attn.q_proj.weight"


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda t: t.pop(Q0), rf"missing tensor '{Q0}' \(expected shape \[32, 32\]\)"),
        (
            lambda t: t.update({"model.layers.0.mlp.extra.weight": np.ones(2, np.float32)}),
            r"model.safetensors: unexpected tensor 'model.layers.0.mlp.extra.weight'",
        ),
        (
            lambda t: t.update({Q0: np.ones((32, 31), np.float32)}),
            rf"model.safetensors: tensor '{Q0}' has shape \[32, 31\], expected \[32, 32\]",
        ),
        (lambda t: t.update({Q0: np.ones((32, 32), np.int32)}), rf"'{Q0}' has dtype int32"),
    ],
    ids=["missing", "unexpected", "shape", "dtype"],
)
def test_bad_tensors_are_named(tmp_path, edit, message):
    _saved(tmp_path)
    _rewrite(tmp_path, edit)
    with pytest.raises(ValueError, match=message):
        hf.load_pretrained(tmp_path)


def test_rotary_tables_and_tied_lm_head_are_ignored(tmp_path):
    _, params = _saved(tmp_path, tiny_config(tie_word_embeddings=True))

    def add(tensors):
        tensors["model.layers.0.self_attn.rotary_emb.inv_freq"] = np.ones(4, np.float32)
        tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"]

    _rewrite(tmp_path, add)
    _assert_same(hf.load_pretrained(tmp_path)[1], params)


def test_missing_files_are_named(tmp_path):
    _saved(tmp_path / "a", max_shard_size=20_000)
    shard = sorted(n for n in os.listdir(tmp_path / "a") if n.endswith(".safetensors"))[1]
    os.remove(tmp_path / "a" / shard)
    with pytest.raises(FileNotFoundError, match=re.escape(shard)):
        hf.load_pretrained(tmp_path / "a")
    _saved(tmp_path / "b")
    os.remove(tmp_path / "b" / "model.safetensors")
    with pytest.raises(FileNotFoundError, match=r"no model\.safetensors"):
        hf.load_pretrained(tmp_path / "b")
    os.remove(tmp_path / "b" / "config.json")
    with pytest.raises(FileNotFoundError, match=r"config\.json"):
        hf.load_pretrained(tmp_path / "b")


_CORRUPT = r"model\.safetensors: corrupt or truncated safetensors file"


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda raw: raw[: len(raw) - 100], rf"{_CORRUPT}.*file not fully covered"),
        (lambda raw: raw[:5], rf"{_CORRUPT}.*header too small"),
        (lambda raw: raw[:8] + b"\xff" * 40 + raw[48:], rf"{_CORRUPT}.*invalid UTF-8"),
        (lambda raw: b"\xff" * 8 + raw[8:], rf"{_CORRUPT}.*header too large"),
    ],
    ids=["truncated", "tiny", "garbled_header", "header_length"],
)
def test_corrupt_files_are_named(tmp_path, damage, message):
    _saved(tmp_path)
    raw = (tmp_path / "model.safetensors").read_bytes()
    (tmp_path / "model.safetensors").write_bytes(damage(raw))
    with pytest.raises(ValueError, match=message):
        hf.load_pretrained(tmp_path)


def test_quantizer_hook_gets_each_layer_kernel(tmp_path, monkeypatch):
    cfg, params = _saved(tmp_path)
    monkeypatch.setattr(hf, "QUANTIZERS", {})  # as if nothing had registered "nf4"
    with pytest.raises(ValueError, match=r"'nf4' has no registered quantizer"):
        hf.load_pretrained(tmp_path, quantize="nf4")
    seen = []

    def halves(kernel, module):
        seen.append((module, kernel.shape, kernel.dtype))
        return _Halves(kernel / 2, kernel / 2)

    hf.register_quantizer("halves", halves)
    _, loaded = hf.load_pretrained(tmp_path, dtype=jnp.bfloat16, quantize="halves")
    assert len(seen) == 7 * cfg.num_hidden_layers
    assert ("k_proj", (32, 16), jnp.bfloat16) in seen
    node_ = loaded["layers"]["mlp"]["down_proj"]["kernel"]
    assert isinstance(node_, _Halves) and node_.a.shape == (2, 64, 32)
    assert loaded["lm_head"]["kernel"].dtype == jnp.bfloat16
    ids = np.arange(10)[None]
    expected = jax.tree.map(lambda a: a.astype(jnp.bfloat16), params)
    np.testing.assert_array_equal(_logits(loaded, cfg, ids), _logits(expected, cfg, ids))

    hf.register_quantizer("ragged", lambda kernel, module: kernel[: np.random.randint(1, 3)])
    with pytest.raises(ValueError, match="different structure"):
        hf.load_pretrained(tmp_path, quantize="ragged")


def test_loading_streams_in_small_chunks(tmp_path, monkeypatch):
    cfg = tiny_config(num_hidden_layers=8, hidden_size=128, intermediate_size=512)
    _, params = _saved(tmp_path, cfg)
    monkeypatch.setattr(hf, "CHUNK_BYTES", 4096)  # 8 rows of a 128-wide fp32 tensor
    hf.load_pretrained(tmp_path)  # compile first: measure steady-state host staging only
    tracemalloc.start()
    _, loaded = hf.load_pretrained(tmp_path)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    _assert_same(loaded, params)
    largest = 128 * 512 * 4  # 256 KiB; the params are 8.4 MB
    assert peak < largest, (peak, largest)
