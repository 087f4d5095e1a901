"""Prompt methods over an NF4 (+ double quantization) base, against peft over bitsandbytes.

One fp32 checkpoint is loaded twice: ``hf.load_pretrained(quantize="nf4")`` here and
transformers + bitsandbytes NF4 + DQ (CPU, fp32 compute) under peft. Each method's
adapter reaches peft through ``save_hf_adapter`` / ``PeftModel.from_pretrained``.
Logits are checked for every method; cached decoding and training once per way a
method enters the model (soft prompt, prefix, adaption prompt), each with the
reparameterized variant (P-tuning's MLP, the prefix projection), which covers the
plain one's path too.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import peft
import pytest
from bitsandbytes.nn import Linear4bit
from conftest import bnb_4bit_model, saved_nf4_base, sgd_train
from test_prompts_peft import _peft, _peft_greedy

import jpeft
from jpeft.models import hf, llama
from jpeft.models.generate import generate
from jpeft.quant import QuantizedWeight

N = 3
METHODS = {
    "prompt": jpeft.PromptTuning(num_virtual_tokens=N),
    "ptuning_mlp": jpeft.PTuning(num_virtual_tokens=N, encoder_hidden_size=8),
    "prefix_projection": jpeft.PrefixTuning(num_virtual_tokens=N, encoder_hidden_size=8),
    "ptuning_v2": jpeft.PTuningV2(num_virtual_tokens=N),
    "llama_adapter": jpeft.LlamaAdapter(adapter_len=N, adapter_layers=1),
}
# one method per path into the model, and the left padding its decoding is compared with
# (peft drops position_ids for soft prompts, so there only unpadded prompts decode alike)
DECODE = {"ptuning_mlp": 0, "prefix_projection": 3, "llama_adapter": 3}


def _is_q(x):
    return isinstance(x, QuantizedWeight)


def _quantized(tree):
    return [x for x in jax.tree.leaves(tree, is_leaf=_is_q) if _is_q(x)]


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """(cfg, our NF4 params, the fp32 checkpoint dir, ids [2, 9], mask with a right-padded row)."""
    cfg, _, path = saved_nf4_base(tmp_path_factory)
    _, params4 = hf.load_pretrained(path, quantize="nf4")
    assert len(_quantized(params4)) == 7  # every decoder projection
    rs = np.random.RandomState(0)
    ids = rs.randint(0, cfg.vocab_size, (2, 9)).astype(np.int32)
    mask = np.ones((2, 9), np.int32)
    mask[1, 6:] = 0
    return cfg, params4, path, ids, mask


@pytest.fixture(scope="module")
def adapted(base, tmp_path_factory):
    """``adapted(name)``: (our adapted NF4 params, peft over bitsandbytes with the same adapter)."""
    cfg, params4, path, _, _ = base

    @functools.cache
    def make(name):
        method = METHODS[name]
        params = method.init(jax.random.key(1), params4, cfg)
        if isinstance(method, jpeft.LlamaAdapter):  # open the zero-initialized gate
            node = params["adaption"]
            params = {**params, "adaption": dataclasses.replace(node, gate=node.gate + 0.7)}
        adapter_dir = tmp_path_factory.mktemp(name)
        jpeft.save_hf_adapter(adapter_dir, method, params, cfg)
        bnb_model = bnb_4bit_model(path)
        assert isinstance(bnb_model.model.layers[0].mlp.down_proj, Linear4bit)
        return params, peft.PeftModel.from_pretrained(bnb_model, adapter_dir).eval()

    return make


@functools.partial(jax.jit, static_argnames="cfg")
def _forward(params, ids, mask, *, cfg):
    return llama.forward(params, cfg, ids, attention_mask=mask)


@pytest.mark.parametrize("name", list(METHODS))
def test_logits_equal_peft_over_bitsandbytes(base, adapted, name):
    cfg, _, _, ids, mask = base
    params, model = adapted(name)
    out = np.asarray(_forward(params, jnp.asarray(ids), jnp.asarray(mask), cfg=cfg))
    ref = _peft(model, ids, mask)
    valid = mask.astype(bool)
    err = np.abs(out - ref)[valid].max() / np.abs(ref[valid]).max()
    assert err < 1e-5, err


@pytest.mark.parametrize("name", list(DECODE))
def test_cached_greedy_decoding_equals_peft_forward_loop(base, adapted, name):
    cfg, _, _, ids, _ = base
    params, model = adapted(name)
    ids = ids[:, :7]
    mask = np.ones_like(ids)
    mask[1, : DECODE[name]] = 0
    out = generate(params, cfg, ids, mask, max_new_tokens=4, stop_tokens=())
    np.testing.assert_array_equal(np.asarray(out.tokens), _peft_greedy(model, ids, mask, 4))


@pytest.mark.parametrize("name", list(DECODE))
def test_training_moves_only_the_prompt_and_keeps_4_bit_weights(base, adapted, name):
    cfg, _, _, ids, _ = base
    params, _ = adapted(name)
    # The random base (init std 0.02) predicts nearly uniformly, so gradients w.r.t. the
    # prompts are tiny: plain SGD needs a large step to move the loss in a few steps.
    trained, losses = sgd_train(params, cfg, jnp.asarray(ids), steps=6, lr=300.0)
    assert all(np.diff(losses) < 0) and losses[-1] < losses[0] - 0.05, losses
    (start, frozen), (end, frozen_after) = jpeft.split(params), jpeft.split(trained)
    assert set(start) <= {"prompt", "prefix", "adaption"}  # nothing of the base
    moved = jax.tree.map(lambda a, b: bool(jnp.any(a != b)), end, start)
    assert all(jax.tree.leaves(moved))
    assert len(_quantized(frozen_after)) == 7
    jax.tree.map(np.testing.assert_array_equal, frozen_after, frozen)  # bit-identical
