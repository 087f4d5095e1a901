"""Chunked lm_head + cross-entropy equals the loss on full fp32 logits, with its gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jpeft.train.loss import chunk_size, chunked_token_loss, token_loss

B, T, HIDDEN, VOCAB = 3, 11, 16, 37


def _batch():
    rs = np.random.RandomState(0)
    ids = rs.randint(0, VOCAB, (B, T)).astype(np.int32)
    attention = np.ones((B, T), np.int32)
    attention[1, 8:] = 0  # right padding
    attention[2, :3] = 0  # left padding
    loss_mask = attention.copy()
    loss_mask[:, :2] = 0  # a prompt
    segments = np.array([[1] * 5 + [2] * 6, [1] * 8 + [0] * 3, [0] * 3 + [1] * 8], np.int32)
    return ids, loss_mask, attention, segments


def _head(params, h, index):
    del index
    return jnp.tanh(h @ params["w"]) @ params["out"] + params["bias"]


@pytest.mark.parametrize("chunk", [1, 4, None])  # 4 pads T=11 up to 12
def test_chunked_loss_and_gradients_equal_full_logits(chunk):
    keys = jax.random.split(jax.random.key(0), 4)
    params = {
        "w": jax.random.normal(keys[0], (HIDDEN, HIDDEN)) / 4,
        "out": jax.random.normal(keys[1], (HIDDEN, VOCAB)),
        "bias": jax.random.normal(keys[2], (VOCAB,)),
    }
    hidden = jax.random.normal(keys[3], (B, T, HIDDEN))
    labels = _batch()

    def full(params, hidden):
        return token_loss(_head(params, hidden, 0), *labels)

    def chunked(params, hidden):
        return chunked_token_loss(hidden, _head, params, *labels, chunk=chunk)

    grads = lambda f: jax.jit(jax.value_and_grad(lambda *a: f(*a)[0], argnums=(0, 1)))
    ref, ours = grads(full)(params, hidden), grads(chunked)(params, hidden)
    for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(ref), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    assert int(chunked(params, hidden)[1]) == int(full(params, hidden)[1]) > 0


def test_chunk_size_keeps_logits_within_budget():
    assert chunk_size(4, 128_256) * 4 * 128_256 * 4 <= 256 * 2**20
    assert chunk_size(1, 10**9) == 1
