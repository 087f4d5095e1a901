"""LoRA semantics (peft's checklist): no-op init, scaling, training, merge/unmerge, I/O.

Tests reuse a few adapter shapes so that jitted functions compile once per structure.
"""

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
from jpeft.models import llama
from jpeft.models.context import Context
from jpeft.models.linear import matmul

forward = jax.jit(llama.forward, static_argnums=1)
LORA = LoRA(r=4, alpha=16, targets="all-linear")
DORA = dataclasses.replace(LORA, use_dora=True)


@jax.jit
def project(w, x, rng=None):
    """One projection through the dispatching matmul (training mode when ``rng`` is given)."""
    return matmul(w, x, Context(rng=rng), "q_proj")


def is_lora(x):
    return isinstance(x, LoRAWeight)


def randomize(params, seed=0, scale=0.3):
    """Random B (and DoRA magnitudes scaled around their init) so adapters are not no-ops."""
    rs = np.random.RandomState(seed)
    leaves, treedef = jax.tree.flatten(params, is_leaf=is_lora)
    for n, x in enumerate(leaves):
        if not is_lora(x):
            continue
        adapters = []
        for ad in x.adapters:
            new = {"b": jnp.asarray(scale * rs.randn(*ad.b.shape), jnp.float32)}
            if ad.magnitude is not None:
                noise = 1 + 0.2 * rs.randn(*ad.magnitude.shape)
                new["magnitude"] = jnp.asarray(np.asarray(ad.magnitude) * noise, jnp.float32)
            adapters.append(dataclasses.replace(ad, **new))
        leaves[n] = LoRAWeight(x.base, tuple(adapters))
    return jax.tree.unflatten(treedef, leaves)


def q_node(params):
    return params["layers"]["self_attn"]["q_proj"]["kernel"]


def layer_of(node, i):
    """Layer ``i`` of a stacked node, as numpy arrays."""
    return jax.tree.map(lambda a: np.asarray(a)[i], node)


@pytest.mark.parametrize("method", [LORA, DORA], ids=["lora", "dora"])
def test_init_is_a_noop(params, cfg, batch, method):
    ids, mask = batch
    adapted = method.init(jax.random.key(1), params, cfg)
    base = forward(params, cfg, ids, attention_mask=mask)
    out = forward(adapted, cfg, ids, attention_mask=mask)
    np.testing.assert_allclose(out, base, atol=1e-6 if method.use_dora else 0)


def test_init_distributions(params, cfg):
    fan_in = cfg.hidden_size
    ad = q_node(LoRA(r=4).init(jax.random.key(1), params, cfg)).adapters[0]
    assert ad.a.shape == (cfg.num_hidden_layers, fan_in, 4) and not ad.b.any()
    bound = 1 / math.sqrt(fan_in)  # kaiming_uniform_(a=sqrt(5)) on torch's [r, in]
    assert bound >= float(jnp.abs(ad.a).max()) > 0.9 * bound
    gauss = q_node(LoRA(r=4, init_weights="gaussian").init(jax.random.key(1), params, cfg))
    assert abs(float(gauss.adapters[0].a.std()) - 1 / 4) < 0.04 and not gauss.adapters[0].b.any()


@pytest.mark.parametrize("use_rslora", [False, True])
def test_scaling_matches_hand_computation(params, cfg, use_rslora):
    method = LoRA(r=4, alpha=6, use_rslora=use_rslora)
    node = q_node(randomize(method.init(jax.random.key(1), params, cfg)))
    expected = 6 / (math.sqrt(4) if use_rslora else 4)
    np.testing.assert_allclose(node.adapters[0].scaling, [expected] * cfg.num_hidden_layers)
    layer = layer_of(node, 1)
    ad = layer.adapters[0]
    x = np.random.RandomState(3).randn(2, 5, cfg.hidden_size).astype(np.float32)
    ref = x @ layer.base + expected * (x @ ad.a @ ad.b)
    np.testing.assert_allclose(project(layer, x), ref, rtol=1e-5, atol=1e-6)


def test_dora_matches_hand_computation(params, cfg):
    node = q_node(randomize(LoRA(r=4, alpha=8, use_dora=True).init(jax.random.key(1), params, cfg)))
    layer = layer_of(node, 0)
    ad = layer.adapters[0]
    x = np.random.RandomState(3).randn(2, 5, cfg.hidden_size).astype(np.float32)
    w = layer.base + 2.0 * ad.a @ ad.b  # [in, out]; peft's norm is over torch's dim 1 = in
    ref = x @ (ad.magnitude * w / np.linalg.norm(w, axis=0))
    np.testing.assert_allclose(project(layer, x), ref, rtol=1e-5, atol=1e-6)


def test_dropout_only_on_the_adapter_branch(params, cfg):
    fresh = LoRA(r=4, dropout=0.5).init(jax.random.key(1), params, cfg)
    x = np.random.RandomState(3).randn(2, 5, cfg.hidden_size).astype(np.float32)
    rng = jax.random.key(7)
    # B = 0: whatever dropout does to the adapter input, the output is the base's.
    layer = layer_of(q_node(fresh), 0)
    np.testing.assert_allclose(project(layer, x, rng), x @ layer.base, atol=1e-6)
    adapted = randomize(fresh)
    layer = layer_of(q_node(adapted), 0)
    ad = layer.adapters[0]
    ref = x @ layer.base + 2.0 * x @ ad.a @ ad.b
    np.testing.assert_allclose(project(layer, x), ref, rtol=1e-5, atol=1e-6)
    # Training: the base sees x, the adapter sees x * keep / (1 - p) (the module's stream).
    key = jax.random.fold_in(Context(rng=rng).module_rng("q_proj"), ad.index)
    dropped = np.where(jax.random.bernoulli(key, 0.5, x.shape), x / 0.5, 0.0)
    ref = x @ layer.base + 2.0 * dropped @ ad.a @ ad.b
    np.testing.assert_allclose(project(layer, x, rng), ref, rtol=1e-5, atol=1e-5)


def test_only_adapter_params_change(params, cfg, batch):
    ids, mask = batch
    # v_proj: rank 4 in layer 0, 2 in layer 1 (zero-padded); q_proj: layer 1 only.
    targets = ("v_proj", "model.layers.1.self_attn.q_proj")
    method = LoRA(
        r=4, targets=targets, rank_pattern={"layers.1.self_attn.v_proj": 2}, use_dora=True
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
    jax.tree.map(np.testing.assert_array_equal, jpeft.split(end)[1], frozen)
    attn = [p["layers"]["self_attn"] for p in (end, start)]
    (v, v0), (q, q0) = ([a[m]["kernel"].adapters[0] for a in attn] for m in ("v_proj", "q_proj"))
    assert v.b[0].all() and v.b[1, :2].all() and (v.magnitude != v0.magnitude).all()
    assert not v.a[1, :, 2:].any() and not v.b[1, 2:].any()  # rank padding stays zero
    assert q.b[1].all() and (q.magnitude[1] != q0.magnitude[1]).all()
    assert not q.a[0].any() and not q.b[0].any() and not q.magnitude[0].any()  # untouched


@pytest.mark.parametrize("method", [LORA, DORA], ids=["lora", "dora"])
def test_merge_equals_unmerged_and_unmerge_restores(params, cfg, batch, method):
    ids, mask = batch
    adapted = randomize(method.init(jax.random.key(1), params, cfg))
    merged = jpeft.merge(adapted)
    assert not any(is_lora(x) for x in jax.tree.leaves(merged, is_leaf=is_lora))
    out = forward(adapted, cfg, ids, attention_mask=mask)
    np.testing.assert_allclose(forward(merged, cfg, ids, attention_mask=mask), out, atol=1e-5)
    jax.tree.map(np.testing.assert_array_equal, jpeft.merge(merged), merged)  # idempotent
    restored = jpeft.unmerge(merged, adapted)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), restored, adapted)


def test_unmerge_needs_no_base_for_plain_lora(params, cfg):
    strip = lambda p: jax.tree.map(
        lambda x: LoRAWeight(None, x.adapters) if is_lora(x) else x, p, is_leaf=is_lora
    )
    adapted = randomize(LORA.init(jax.random.key(1), params, cfg))
    restored = jpeft.unmerge(jpeft.merge(adapted), strip(adapted))
    np.testing.assert_allclose(q_node(restored).base, q_node(adapted).base, atol=1e-6)
    dora = randomize(DORA.init(jax.random.key(1), params, cfg))
    with pytest.raises(ValueError, match="DoRA"):
        jpeft.unmerge(jpeft.merge(dora), strip(dora))


def test_save_load_round_trip(params, cfg, batch, tmp_path):
    ids, mask = batch
    method = dataclasses.replace(DORA, layers_to_transform=(0,), alpha_pattern={"up_proj": 3})
    adapted = randomize(method.init(jax.random.key(1), params, cfg))
    jpeft.save_hf_adapter(tmp_path, method, adapted, cfg)
    loaded_method, loaded = jpeft.load_hf_adapter(tmp_path, params, cfg)
    assert dataclasses.replace(loaded_method, targets="all-linear") == method
    out = forward(adapted, cfg, ids, attention_mask=mask)
    np.testing.assert_allclose(forward(loaded, cfg, ids, attention_mask=mask), out, atol=1e-6)


def test_adapter_name_makes_no_difference(params, cfg):
    named = dataclasses.replace(LORA, adapter_name="x")
    a = randomize(LORA.init(jax.random.key(1), params, cfg))
    b = randomize(named.init(jax.random.key(1), params, cfg))
    jax.tree.map(np.testing.assert_array_equal, jpeft.merge(a), jpeft.merge(b))
    ta, tb = LORA.adapter_tensors(a, cfg), named.adapter_tensors(b, cfg)
    assert ta.keys() == tb.keys()
    jax.tree.map(np.testing.assert_array_equal, ta, tb)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"targets": ("q_proj", "qkv_proj")}, r"\['qkv_proj'\].*valid names.*q_proj"),
        ({"targets": ("lm_heads",)}, "valid names"),
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
    adapted = DORA.init(jax.random.key(1), params, cfg)
    q = sharding.logical_axes(adapted)["layers"]["self_attn"]["q_proj"]["kernel"]
    base = sharding.base_axes(("layers", "self_attn", "q_proj", "kernel"))
    assert q.base == base
    ad = q.adapters[0]
    assert ad.a == (base[0], base[1], None) and ad.b == (base[0], None, base[2])
    assert ad.magnitude == (base[0], base[2]) and ad.scaling == (base[0],)
    trainable, _ = jpeft.split(adapted)
    t_axes = sharding.logical_axes(trainable)["layers"]["mlp"]["down_proj"]["kernel"]
    assert t_axes.base is None and t_axes.adapters[0].scaling is None
