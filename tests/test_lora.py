"""LoRA semantics (peft's checklist): no-op init, scaling, training, merge/unmerge, I/O."""

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import next_token_loss

import jpeft
from jpeft import sharding
from jpeft.lora import LoRA, LoRAWeight
from models import llama
from models.context import Context
from models.linear import matmul

forward = jax.jit(llama.forward, static_argnums=1)
# Tests share these shapes so the jitted forward compiles once per structure.
LORA = LoRA(r=4, alpha=16, targets="all-linear", rank_pattern={"q_proj": 2})
DORA = dataclasses.replace(LORA, use_dora=True)


def _is_lora(x):
    return isinstance(x, LoRAWeight)


def randomize(params, key, scale=0.3):
    """Random B (and DoRA magnitudes scaled around their init) so adapters are not no-ops."""
    leaves, treedef = jax.tree.flatten(params, is_leaf=_is_lora)
    for n, x in enumerate(leaves):
        if not _is_lora(x):
            continue
        adapters = []
        for i, ad in enumerate(x.adapters):
            k1, k2 = jax.random.split(jax.random.fold_in(key, 100 * n + i))
            new = {"b": scale * jax.random.normal(k1, ad.b.shape)}
            if ad.magnitude is not None:
                noise = 1 + 0.2 * jax.random.normal(k2, ad.magnitude.shape)
                new["magnitude"] = ad.magnitude * noise
            adapters.append(dataclasses.replace(ad, **new))
        leaves[n] = LoRAWeight(x.base, tuple(adapters))
    return jax.tree.unflatten(treedef, leaves)


def q_node(params):
    return params["layers"]["self_attn"]["q_proj"]["kernel"]


@pytest.mark.parametrize("init_weights", ["default", "gaussian"])
@pytest.mark.parametrize("use_dora", [False, True])
def test_init_is_a_noop(params, cfg, batch, init_weights, use_dora):
    ids, mask = batch
    method = dataclasses.replace(DORA if use_dora else LORA, init_weights=init_weights)
    adapted = method.init(jax.random.key(1), params, cfg)
    base = forward(params, cfg, ids, attention_mask=mask)
    out = forward(adapted, cfg, ids, attention_mask=mask)
    np.testing.assert_allclose(out, base, atol=1e-6 if use_dora else 0)


def test_init_distributions(params, cfg):
    fan_in = cfg.hidden_size
    ad = q_node(LoRA(r=8).init(jax.random.key(1), params, cfg)).adapters[0]
    assert ad.a.shape == (cfg.num_hidden_layers, fan_in, 8) and not ad.b.any()
    bound = 1 / math.sqrt(fan_in)  # kaiming_uniform_(a=sqrt(5)) on torch's [r, in]
    assert float(jnp.abs(ad.a).max()) <= bound and float(jnp.abs(ad.a).max()) > 0.9 * bound
    gauss = q_node(LoRA(r=8, init_weights="gaussian").init(jax.random.key(1), params, cfg))
    assert abs(float(gauss.adapters[0].a.std()) - 1 / 8) < 0.02


@pytest.mark.parametrize("use_rslora", [False, True])
def test_scaling_matches_hand_computation(params, cfg, use_rslora):
    method = LoRA(r=4, alpha=6, use_rslora=use_rslora)
    node = q_node(randomize(method.init(jax.random.key(1), params, cfg), jax.random.key(2)))
    expected = 6 / (math.sqrt(4) if use_rslora else 4)
    np.testing.assert_allclose(node.adapters[0].scaling, [expected] * cfg.num_hidden_layers)
    layer = jax.tree.map(lambda a: a[1], node)
    x = jax.random.normal(jax.random.key(3), (2, 5, cfg.hidden_size))
    ad = layer.adapters[0]
    ref = x @ layer.base + expected * (x @ ad.a @ ad.b)
    np.testing.assert_allclose(matmul(layer, x, Context(), "q_proj"), ref, rtol=1e-5, atol=1e-6)


def test_dora_matches_hand_computation(params, cfg):
    method = LoRA(r=4, alpha=8, use_dora=True)
    node = q_node(randomize(method.init(jax.random.key(1), params, cfg), jax.random.key(2)))
    layer = jax.tree.map(lambda a: a[0], node)
    ad = layer.adapters[0]
    x = jax.random.normal(jax.random.key(3), (2, 5, cfg.hidden_size))
    w = layer.base + 2.0 * ad.a @ ad.b  # [in, out]; peft's norm is over torch dim 1 = in
    ref = x @ (ad.magnitude * w / jnp.linalg.norm(w, axis=0))
    np.testing.assert_allclose(matmul(layer, x, Context(), "q_proj"), ref, rtol=1e-5, atol=1e-6)


def test_dropout_only_on_the_adapter_branch(params, cfg, batch):
    method = LoRA(r=4, dropout=0.5)
    fresh = method.init(jax.random.key(1), params, cfg)
    x = jax.random.normal(jax.random.key(3), (2, 5, cfg.hidden_size))
    train = Context(rng=jax.random.key(7))
    # B = 0: whatever dropout does to the adapter input, the output is the base's.
    layer = jax.tree.map(lambda a: a[0], q_node(fresh))
    np.testing.assert_array_equal(matmul(layer, x, train, "q_proj"), x @ layer.base)
    adapted = randomize(fresh, jax.random.key(2))
    layer = jax.tree.map(lambda a: a[0], q_node(adapted))
    ad = layer.adapters[0]
    np.testing.assert_allclose(
        matmul(layer, x, Context(), "q_proj"), x @ layer.base + 2.0 * x @ ad.a @ ad.b, atol=1e-6
    )
    # Training: the base sees x, the adapter sees x * keep / (1 - p) (the module's stream).
    key = jax.random.fold_in(train.module_rng("q_proj"), ad.index)
    dropped = jnp.where(jax.random.bernoulli(key, 0.5, x.shape), x / 0.5, 0.0)
    ref = x @ layer.base + 2.0 * dropped @ ad.a @ ad.b
    np.testing.assert_allclose(matmul(layer, x, train, "q_proj"), ref, atol=1e-5)
    ids, _ = batch
    logits = jax.jit(
        lambda p, k: llama.Llama(cfg).apply(
            {"params": p}, ids, deterministic=False, rngs={"dropout": k}
        )
    )
    first = logits(adapted, jax.random.key(0))
    np.testing.assert_array_equal(first, logits(adapted, jax.random.key(0)))
    assert not np.allclose(first, logits(adapted, jax.random.key(1)))


def test_only_adapter_params_change(params, cfg, batch):
    ids, mask = batch
    method = LoRA(
        r=4,
        alpha=8,
        targets=("q_proj", "v_proj", "down_proj"),
        rank_pattern={"v_proj": 2},
        layers_to_transform=(1,),
        use_dora=True,
    )
    start = method.init(jax.random.key(1), params, cfg)
    trainable, frozen = jpeft.split(start)
    tx = optax.adamw(1e-2, weight_decay=0.1)
    opt = tx.init(trainable)

    @jax.jit
    def step(trainable, opt):
        loss, grads = jax.value_and_grad(
            lambda t: next_token_loss(jpeft.combine(t, frozen), cfg, ids, mask)
        )(trainable)
        updates, opt = tx.update(grads, opt, trainable)
        return optax.apply_updates(trainable, updates), opt, loss

    losses = []
    for _ in range(4):
        trainable, opt, loss = step(trainable, opt)
        losses.append(float(loss))
    assert losses[-1] < losses[0]
    end = jpeft.combine(trainable, frozen)
    _, frozen_after = jpeft.split(end)
    jax.tree.map(np.testing.assert_array_equal, frozen_after, frozen)
    v = end["layers"]["self_attn"]["v_proj"]["kernel"].adapters[0]
    assert v.a[1, :, :2].any() and v.b[1, :2].any()  # trained ...
    assert not v.a[1, :, 2:].any() and not v.b[1, 2:].any()  # ... padding stays zero
    assert not v.a[0].any() and not v.b[0].any()  # untouched layer stays zero
    start_v = start["layers"]["self_attn"]["v_proj"]["kernel"].adapters[0]
    np.testing.assert_array_equal(v.magnitude[0], start_v.magnitude[0])
    assert not np.array_equal(v.magnitude[1], start_v.magnitude[1])


@pytest.mark.parametrize("use_dora", [False, True])
def test_merge_equals_unmerged_and_unmerge_restores(params, cfg, batch, use_dora):
    ids, mask = batch
    method = DORA if use_dora else LORA
    adapted = randomize(method.init(jax.random.key(1), params, cfg), jax.random.key(2))
    merged = jpeft.merge(adapted)
    assert not any(_is_lora(x) for x in jax.tree.leaves(merged, is_leaf=_is_lora))
    out = forward(adapted, cfg, ids, attention_mask=mask)
    np.testing.assert_allclose(forward(merged, cfg, ids, attention_mask=mask), out, atol=1e-5)
    jax.tree.map(np.testing.assert_array_equal, jpeft.merge(merged), merged)  # idempotent
    restored = jpeft.unmerge(merged, adapted)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), restored, adapted)


def test_unmerge_needs_no_base_for_plain_lora(params, cfg):
    adapted = randomize(LoRA(r=4).init(jax.random.key(1), params, cfg), jax.random.key(2))
    strip = lambda x: LoRAWeight(None, x.adapters) if _is_lora(x) else x
    no_base = jax.tree.map(strip, adapted, is_leaf=_is_lora)
    restored = jpeft.unmerge(jpeft.merge(adapted), no_base)
    np.testing.assert_allclose(q_node(restored).base, q_node(adapted).base, atol=1e-6)
    dora = randomize(
        LoRA(r=4, use_dora=True).init(jax.random.key(1), params, cfg), jax.random.key(2)
    )
    with pytest.raises(ValueError, match="DoRA"):
        jpeft.unmerge(jpeft.merge(dora), jax.tree.map(strip, dora, is_leaf=_is_lora))


def test_save_load_round_trip(params, cfg, batch, tmp_path):
    ids, mask = batch
    method = dataclasses.replace(DORA, layers_to_transform=(0,), alpha_pattern={"up_proj": 3})
    adapted = randomize(method.init(jax.random.key(1), params, cfg), jax.random.key(2))
    jpeft.save_hf_adapter(tmp_path, method, adapted, cfg)
    loaded_method, loaded = jpeft.load_hf_adapter(tmp_path, params, cfg)
    assert loaded_method.plans(cfg) == method.plans(cfg)
    assert dataclasses.replace(loaded_method, targets="all-linear") == method
    out = forward(adapted, cfg, ids, attention_mask=mask)
    np.testing.assert_allclose(forward(loaded, cfg, ids, attention_mask=mask), out, atol=1e-6)


def test_adapter_name_makes_no_difference(params, cfg, batch):
    ids, _ = batch
    named = dataclasses.replace(LORA, adapter_name="x")
    a = randomize(LORA.init(jax.random.key(1), params, cfg), jax.random.key(2))
    b = randomize(named.init(jax.random.key(1), params, cfg), jax.random.key(2))
    np.testing.assert_array_equal(forward(a, cfg, ids), forward(b, cfg, ids))
    ta, tb = LORA.peft_tensors(a, cfg), named.peft_tensors(b, cfg)
    assert ta.keys() == tb.keys()
    jax.tree.map(np.testing.assert_array_equal, ta, tb)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"targets": ("q_proj", "qkv_proj")}, r"\['qkv_proj'\].*valid names.*q_proj"),
        ({"targets": ("lm_head",)}, "valid names"),
        ({"targets": r".*\.nope"}, "match no module"),
        ({"layers_to_transform": (5,)}, "out of range"),
        ({"rank_pattern": {"q_prj": 2}}, "rank_pattern keys"),
    ],
)
def test_bad_targets_raise(params, cfg, kwargs, match):
    with pytest.raises(ValueError, match=match):
        LoRA(**kwargs).init(jax.random.key(0), params, cfg)


def test_bad_options_raise():
    with pytest.raises(ValueError, match="regex"):
        LoRA(targets=r".*q_proj", layers_to_transform=(0,))
    with pytest.raises(ValueError, match="init_weights"):
        LoRA(init_weights="pissa")
    with pytest.raises(ValueError, match="positive"):
        LoRA(r=0)


def test_logical_axes_follow_the_base(params, cfg):
    adapted = LoRA(r=4, targets=("q_proj", "down_proj"), use_dora=True).init(
        jax.random.key(1), params, cfg
    )
    axes = sharding.logical_axes(adapted)
    q = axes["layers"]["self_attn"]["q_proj"]["kernel"]
    base = sharding.base_axes(("layers", "self_attn", "q_proj", "kernel"))
    assert q.base == base
    ad = q.adapters[0]
    assert ad.a == (base[0], base[1], None) and ad.b == (base[0], None, base[2])
    assert ad.magnitude == (base[0], base[2]) and ad.scaling == (base[0],)
    trainable, _ = jpeft.split(adapted)
    t_axes = sharding.logical_axes(trainable)["layers"]["mlp"]["down_proj"]["kernel"]
    assert t_axes.base is None and t_axes.adapters[0].scaling is None
