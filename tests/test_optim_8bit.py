"""AdamW with 8-bit states: bitsandbytes parity, fp32-AdamW tracking, state size."""

import bitsandbytes as bnb
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
from conftest import tiny_config

import jpeft
from jpeft.models import llama
from jpeft.optim import QuantizedMoment, adamw_8bit, scale_by_adam_8bit


def _state_bytes(state) -> int:
    return sum(leaf.nbytes for leaf in jax.tree.leaves(state))


def test_matches_bnb_adamw8bit_steps():
    """Five steps against bnb.optim.AdamW8bit (CPU): identical 8-bit states, params to ~1 ulp."""
    rng = np.random.default_rng(0)
    shapes = {"big": (37, 173), "small": (50, 30)}  # 6401 elements (partial block) and 1500
    params = {k: rng.standard_normal(s).astype(np.float32) for k, s in shapes.items()}
    torch_params = {k: torch.nn.Parameter(torch.from_numpy(v.copy())) for k, v in params.items()}
    reference = bnb.optim.AdamW8bit(list(torch_params.values()), lr=1e-2, weight_decay=0.1)
    tx = adamw_8bit(1e-2, weight_decay=0.1)
    jax_params = jax.tree.map(jnp.asarray, params)
    state = tx.init(jax_params)
    update = jax.jit(tx.update)
    for _ in range(5):
        grads = {
            k: (rng.standard_normal(s) * np.exp(rng.normal(0.0, 2.0, s))).astype(np.float32)
            for k, s in shapes.items()
        }
        for k, p in torch_params.items():
            p.grad = torch.from_numpy(grads[k])
        reference.step()
        updates, state = update(jax.tree.map(jnp.asarray, grads), state, jax_params)
        jax_params = optax.apply_updates(jax_params, updates)

        for k, p in torch_params.items():
            np.testing.assert_allclose(jax_params[k], p.detach().numpy(), rtol=0, atol=2e-6)
        ref_state = reference.state[torch_params["big"]]
        mu, nu = state[0].mu["big"], state[0].nu["big"]
        np.testing.assert_array_equal(mu.codes, ref_state["state1"].numpy())
        np.testing.assert_array_equal(nu.codes, ref_state["state2"].numpy())
        np.testing.assert_array_equal(mu.absmax, ref_state["absmax1"].numpy())
        np.testing.assert_array_equal(nu.absmax, ref_state["absmax2"].numpy())
        small_ref = reference.state[torch_params["small"]]
        np.testing.assert_allclose(
            state[0].mu["small"], small_ref["state1"].numpy(), rtol=1e-5, atol=1e-7
        )
        np.testing.assert_allclose(
            state[0].nu["small"], small_ref["state2"].numpy(), rtol=1e-5, atol=1e-7
        )


def _softmax_regression_losses(tx: optax.GradientTransformation, steps: int) -> np.ndarray:
    """Full-batch softmax regression (4096-element weight, so 8-bit moments), jitted scan."""
    k_x, k_w, k_noise, k_init = jax.random.split(jax.random.key(0), 4)
    x = jax.random.normal(k_x, (2048, 64))
    noise = 4.0 * jax.random.gumbel(k_noise, (2048, 64))  # noisy labels: the loss plateaus
    labels = jnp.argmax(x @ jax.random.normal(k_w, (64, 64)) + noise, axis=-1)
    params = {"w": 0.01 * jax.random.normal(k_init, (64, 64)), "b": jnp.zeros(64)}

    def loss_fn(p):
        logits = x @ p["w"] + p["b"]
        return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

    def step(carry, _):
        p, s = carry
        loss, grads = jax.value_and_grad(loss_fn)(p)
        updates, s = tx.update(grads, s, p)
        return (optax.apply_updates(p, updates), s), loss

    def run(p):
        return jax.lax.scan(step, (p, tx.init(p)), length=steps)[1]

    return np.asarray(jax.jit(run)(params))


def test_tracks_fp32_adamw_on_softmax_regression():
    losses_8bit = _softmax_regression_losses(adamw_8bit(1e-2), 100)
    losses_fp32 = _softmax_regression_losses(optax.adamw(1e-2, weight_decay=0.01), 100)
    assert losses_fp32[-1] < 0.5 * losses_fp32[0]  # it learns
    np.testing.assert_allclose(losses_8bit, losses_fp32, rtol=0.03)


def test_state_is_about_4x_smaller():
    params = {"w1": jnp.zeros((1024, 768)), "w2": jnp.zeros((768, 300)), "b": jnp.zeros(768)}
    bytes_fp32 = _state_bytes(optax.adamw(1e-3).init(params))
    bytes_8bit = _state_bytes(adamw_8bit(1e-3).init(params))
    assert bytes_fp32 / bytes_8bit > 3.9


def test_small_tensors_keep_fp32_moments():
    state = scale_by_adam_8bit().init({"a": jnp.zeros(4095), "b": jnp.zeros((64, 64))})
    assert state.mu["a"].dtype == jnp.float32 and state.mu["a"].shape == (4095,)
    assert isinstance(state.nu["b"], QuantizedMoment)
    assert state.nu["b"].codes.dtype == jnp.uint8 and state.nu["b"].codes.shape == (64, 64)
    assert state.nu["b"].absmax.shape == (16,)


def test_weight_decay_mask_schedule_and_donation():
    params = {"w": jnp.ones((64, 128), jnp.bfloat16), "b": jnp.ones(128, jnp.bfloat16)}
    tx = adamw_8bit(optax.constant_schedule(0.5), weight_decay=0.5, mask={"w": True, "b": False})
    zeros = jax.tree.map(jnp.zeros_like, params)
    update = jax.jit(tx.update, donate_argnums=1)
    updates, _ = update(zeros, tx.init(params), params)
    assert updates["w"].dtype == jnp.bfloat16
    np.testing.assert_array_equal(updates["w"], jnp.full((64, 128), -0.25, jnp.bfloat16))
    np.testing.assert_array_equal(updates["b"], jnp.zeros(128, jnp.bfloat16))


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"b1": 1.0}, "b1"),
        ({"b2": -0.1}, "b2"),
        ({"eps": -1.0}, "eps"),
        ({"blocksize": 0}, "blocksize"),
        ({"min_8bit_size": -1}, "min_8bit_size"),
    ],
)
def test_bad_hyperparameters_raise(kwargs, name):
    with pytest.raises(ValueError, match=name):
        scale_by_adam_8bit(**kwargs)


def test_per_layer_min_8bit_size_and_blocks_match_bnb():
    """LoRA r=16 on hidden 64, 4 stacked layers, against bnb on one tensor per layer.

    The A and B matrices of q_proj hold 1,024 elements per layer: bitsandbytes keeps their
    moments in fp32 (min_8bit_size 4096 counts per tensor, not per stack). up_proj's B holds
    16 x 264 = 4,224 per layer: 8-bit, 16.5 blocks per layer, each layer's last block partial.
    """
    cfg = tiny_config(hidden_size=64, intermediate_size=264, num_hidden_layers=4)
    params = llama.init_params(jax.random.key(0), cfg)
    lora = jpeft.LoRA(r=16, alpha=32, targets=("q_proj", "up_proj"))
    trainable, _ = jpeft.split(lora.init(jax.random.key(1), params, cfg))
    trainable = jax.tree.map(lambda x: x + 0.01, trainable)  # B starts at zero
    leaves, treedef = jax.tree.flatten(trainable)
    torch_params = [
        [torch.nn.Parameter(torch.from_numpy(np.array(leaf[i]))) for i in range(leaf.shape[0])]
        for leaf in leaves
    ]
    reference = bnb.optim.AdamW8bit(
        [p for ps in torch_params for p in ps], lr=1e-2, weight_decay=0.1
    )
    tx = adamw_8bit(1e-2, weight_decay=0.1)
    state = tx.init(trainable)
    mu = treedef.flatten_up_to(state[0].mu)
    quantized = [isinstance(m, QuantizedMoment) for m in mu]
    assert [leaf.shape[1:] for leaf, q in zip(leaves, quantized, strict=True) if q] == [(16, 264)]
    update = jax.jit(tx.update)
    rng = np.random.default_rng(0)
    for _ in range(5):
        grads = [rng.standard_normal(leaf.shape).astype(np.float32) for leaf in leaves]
        for layers, grad in zip(torch_params, grads, strict=True):
            for i, p in enumerate(layers):
                p.grad = torch.from_numpy(grad[i].copy())
        reference.step()
        updates, state = update(
            treedef.unflatten([jnp.asarray(g) for g in grads]), state, trainable
        )
        trainable = optax.apply_updates(trainable, updates)
    for leaf, layers, m, q in zip(
        jax.tree.leaves(trainable),
        torch_params,
        treedef.flatten_up_to(state[0].mu),
        quantized,
        strict=True,
    ):
        for i, p in enumerate(layers):
            np.testing.assert_allclose(leaf[i], p.detach().numpy(), rtol=0, atol=2e-6)
            ref = reference.state[p]
            if q:
                np.testing.assert_array_equal(m.codes[i], ref["state1"].numpy())
                np.testing.assert_array_equal(m.absmax[i], ref["absmax1"].numpy())
            else:
                np.testing.assert_allclose(m[i], ref["state1"].numpy(), rtol=1e-5, atol=1e-7)
