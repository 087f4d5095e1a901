"""Fused attention paths against the XLA reference, fp32, values and gradients.

On CPU the Pallas kernels run in interpret mode (``attention_impl="pallas"``); the
cuDNN path's row compaction is checked through the same ``jax.nn.dot_product_attention``
call with ``implementation="xla"``. Only valid query positions are compared: what a
padding query sees is irrelevant and differs between paths.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import tiny_config
from jax.experimental.pallas import tpu as pltpu

import jpeft
from jpeft.adapters import LlamaAdapter
from jpeft.models import llama
from jpeft.models.attention import CausalMask, attend, compacted_attention
from jpeft.models.flash_attention import flash_attention
from jpeft.train.config import RunConfig

B, T, H, K, D, P = 3, 12, 4, 2, 8, 5
VALID = np.ones((B, T), np.int32)
VALID[0, 9:] = 0  # right padding
VALID[1, :4] = 0  # left padding
SEGMENTS = np.array(
    [[1] * 9 + [0] * 3, [0] * 4 + [1] * 8, [1, 1, 1, 2, 2, 2, 2, 3, 3, 0, 0, 0]], np.int32
)
VALID[2] = SEGMENTS[2] > 0  # packed row: three segments, then padding


def _inputs(seed: int = 0):
    keys = jax.random.split(jax.random.key(seed), 6)
    normal = lambda i, shape: jax.random.normal(keys[i], shape, jnp.float32)
    q, k, v = normal(0, (B, T, H, D)), normal(1, (B, T, K, D)), normal(2, (B, T, K, D))
    prefix = normal(3, (B, P, K, D)), normal(4, (B, P, K, D))
    return q, k, v, prefix, normal(5, (B, T, H, D))


def _loss(mask, q, k, v, prefix, weights, impl):
    """A scalar of the valid queries' outputs only."""
    out = attend(q, k, v, mask, prefix=prefix, implementation=impl)
    return jnp.sum(out * weights * mask.valid[:, :, None, None])


_value_and_grads = jax.jit(jax.value_and_grad(_loss, argnums=(1, 2, 3, 4)), static_argnames="impl")


def _assert_close(ours, ref):
    for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(ref), strict=True):
        np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-5)


def test_pallas_kernel_equals_xla():
    """Right and left padding, a packed row, GQA and prefix keys, in one batch."""
    q, k, v, prefix, weights = _inputs()
    mask = CausalMask(jnp.asarray(VALID), jnp.asarray(SEGMENTS))
    ref = _value_and_grads(mask, q, k, v, prefix, weights, impl="xla")
    ours = _value_and_grads(mask, q, k, v, prefix, weights, impl="pallas")
    _assert_close(ours, ref)


def test_cudnn_row_compaction_equals_xla():
    """Left and right padding and prefix keys through sequence lengths alone."""
    q, k, v, prefix, weights = _inputs(1)
    mask = CausalMask(jnp.asarray(VALID[:2]))  # rows without packing
    q, k, v, weights = q[:2], k[:2], v[:2], weights[:2]
    prefix = prefix[0][:2], prefix[1][:2]

    def compacted(q, k, v, prefix):
        out = compacted_attention(q, k, v, mask.valid, prefix, "xla")
        return jnp.sum(out * weights * mask.valid[:, :, None, None])

    ours = jax.jit(jax.value_and_grad(compacted, argnums=(0, 1, 2, 3)))(q, k, v, prefix)
    ref = _value_and_grads(mask, q, k, v, prefix, weights, impl="xla")
    _assert_close(ours, ref)


def test_tpu_kernels_equal_reference_with_lse_gradient():
    """JAX's TPU kernels (TPU interpret mode): GQA, a packed row and an LSE cotangent."""
    q, k, v, _, weights = _inputs(2)
    q, k, v, weights = q[2:, :, :2], k[2:, :, :1], v[2:, :, :1], weights[2:, :, :2]
    segments = jnp.where(VALID[2:] > 0, SEGMENTS[2:], -1)
    lse_weights = jnp.linspace(-1.0, 1.0, T * 2).reshape(1, T, 2)

    def loss(q, k, v):
        out, lse = flash_attention(q, k, v, segments, scale=D**-0.5, backend="mosaic")
        return jnp.sum(out * weights) + jnp.sum(lse * lse_weights)

    def reference(q, k, v):
        scores = jnp.einsum("bqhd,bkhd->bhqk", q, jnp.repeat(k, 2, axis=2)) * D**-0.5
        mask = jnp.tril(jnp.ones((T, T), bool)) & (segments[:, :, None] == segments[:, None])
        scores = jnp.where(mask[:, None], scores, -jnp.inf)
        out = jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(scores), jnp.repeat(v, H // K, axis=2))
        lse = jax.nn.logsumexp(scores, axis=-1).transpose(0, 2, 1)
        return jnp.sum(out * weights) + jnp.sum(lse * lse_weights)

    with pltpu.force_tpu_interpret_mode():
        ours = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))(q, k, v)
    _assert_close(ours, jax.jit(jax.value_and_grad(reference, argnums=(0, 1, 2)))(q, k, v))


def test_model_with_prompt_prefix_and_adapter_equals_xla():
    """Soft prompt before left padding, prefix keys and LLaMA-Adapter prompts, GQA."""
    cfg = tiny_config(num_hidden_layers=2)
    params = llama.init_params(jax.random.key(0), cfg)
    for i, method in enumerate(
        [
            jpeft.PromptTuning(num_virtual_tokens=3),
            jpeft.PrefixTuning(num_virtual_tokens=4),
            LlamaAdapter(adapter_len=3, adapter_layers=1),
        ]
    ):
        params = method.init(jax.random.key(i + 1), params, cfg)
    gate = jnp.full_like(params["adaption"].gate, 0.5)  # open, so the prompts matter
    params["adaption"] = dataclasses.replace(params["adaption"], gate=gate)
    ids = jax.random.randint(jax.random.key(9), (2, T), 0, cfg.vocab_size)
    valid = VALID[:2].astype(bool)
    forward = jax.jit(llama.forward, static_argnums=1, static_argnames="attention_impl")
    logits = {
        impl: forward(params, cfg, ids, attention_mask=valid, attention_impl=impl)
        for impl in ("pallas", "xla")
    }
    np.testing.assert_allclose(logits["pallas"][valid], logits["xla"][valid], rtol=1e-5, atol=1e-5)


def test_attention_impl_is_validated_and_configurable():
    cfg = tiny_config()
    ids = jnp.zeros((1, 4), jnp.int32)
    params = llama.init_params(jax.random.key(0), cfg)
    with pytest.raises(ValueError, match="attention_impl='flash'; expected one of"):
        llama.forward(params, cfg, ids, attention_impl="flash")
    with pytest.raises(ValueError, match="'cudnn' needs a GPU"):
        llama.Llama(cfg, attention_impl="cudnn").apply({"params": params}, ids)
    assert RunConfig(attention_impl="pallas").attention_impl == "pallas"
    assert RunConfig().attention_impl == "auto"
