"""QLoRA: NF4 base weights against transformers + bitsandbytes (CPU), LoRA on top."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from conftest import bnb_4bit_model, saved_nf4_base, sgd_train

import jpeft
from jpeft import quant
from jpeft.models import hf, llama
from jpeft.train.config import RunConfig
from jpeft.train.prepare import load_weights


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    cfg, params, path = saved_nf4_base(tmp_path_factory)
    reference = bnb_4bit_model(path)
    ids = np.random.RandomState(0).randint(0, cfg.vocab_size, (2, 9))
    with torch.no_grad():
        logits = reference(torch.tensor(ids)).logits.float().numpy()
    return cfg, params, path, ids, logits


def _rel(out, ref):
    return np.abs(np.asarray(out) - ref).max() / np.abs(ref).max()


def test_quantize_on_load_equals_bitsandbytes(setup):
    cfg, _, path, ids, ref = setup
    _, params4 = hf.load_pretrained(path, quantize="nf4")
    assert isinstance(params4["layers"]["mlp"]["up_proj"]["kernel"], quant.QuantizedWeight)
    assert _rel(llama.forward(params4, cfg, jnp.asarray(ids)), ref) < 1e-5


def test_qlora_init_equals_bitsandbytes_and_trains_only_lora(setup):
    cfg, params, _, ids, ref = setup
    method = jpeft.QLoRA(r=4, alpha=8, targets="all-linear")
    adapted = method.init(jax.random.key(1), params, cfg)
    assert _rel(llama.forward(adapted, cfg, jnp.asarray(ids)), ref) < 1e-5
    trained, losses = sgd_train(adapted, cfg, jnp.asarray(ids), steps=8, lr=0.5)
    assert losses[-1] < losses[0]
    jax.tree.map(np.testing.assert_array_equal, jpeft.split(trained)[1], jpeft.split(adapted)[1])


def test_bits_per_parameter(setup):
    _, params, _, _, _ = setup
    kernel = params["layers"]["mlp"]["up_proj"]["kernel"]
    w4 = quant.quantize(kernel, "nf4", blocksize=64, double_quant=True)
    bits = 8 * jpeft.nbytes(w4) / kernel.size
    assert bits == pytest.approx(quant.bits_per_param(64, True), rel=0.02)
    w4_plain = quant.quantize(kernel, "nf4", blocksize=64, double_quant=False)
    assert 8 * jpeft.nbytes(w4_plain) / kernel.size == pytest.approx(4.5)


def test_merge_into_nf4_base_gives_16_bit_weights(setup):
    cfg, params, _, ids, _ = setup
    adapted = jpeft.QLoRA(r=4, targets=("q_proj",)).init(jax.random.key(1), params, cfg)
    with pytest.warns(UserWarning, match="quantizing the merged model again rounds"):
        merged = jpeft.merge(adapted)
    assert not isinstance(merged["layers"]["self_attn"]["q_proj"]["kernel"], jpeft.Node)
    np.testing.assert_allclose(
        np.asarray(llama.forward(merged, cfg, jnp.asarray(ids))),
        np.asarray(llama.forward(adapted, cfg, jnp.asarray(ids))),
        rtol=1e-5,
        atol=1e-5,
    )


def test_bad_blocksize_and_shape():
    with pytest.raises(ValueError, match="blocksize"):
        quant.quantize(jnp.ones((128, 4)), "nf4", blocksize=48)
    with pytest.raises(ValueError, match=r"needs a kernel \[\.\.\., in, out\]"):
        quant.quantize(jnp.ones(96), "nf4", blocksize=64)


def test_cli_quantize_on_load_uses_the_qlora_settings(setup):
    _, _, path, _, _ = setup
    options = {"qlora": {"blocksize": 32, "double_quant": False}}
    run = RunConfig(method="qlora", quantize="nf4", method_options=options)
    kernel = load_weights(str(path), run)["layers"]["mlp"]["up_proj"]["kernel"]
    assert (kernel.blocksize, kernel.double_quant) == (32, False)
    conflict = RunConfig(
        method="qlora", quantize="nf4", method_options={"qlora": {"quant_type": "fp4"}}
    )
    with pytest.raises(ValueError, match="--quantize nf4 conflicts with --qlora-quant-type fp4"):
        load_weights(str(path), conflict)
