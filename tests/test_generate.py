"""KV-cache generation equals transformers' greedy ``generate`` and the uncached forward."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from conftest import hf_twin, tiny_config

from jpeft.models import generate as gen
from jpeft.models import hooks, llama, sampling
from jpeft.models.cache import KVCache
from jpeft.models.context import Context
from jpeft.models.linear import dense, matmul
from jpeft.nodes import Node, node

CFG = tiny_config()


def lively_params(seed: int = 2, scale: float = 2.0):
    """Random params with larger weights, so greedy continuations vary and ties are rare."""

    def grow(path, a):
        return a * scale if path[-1].key in ("kernel", "embedding") else a

    return jax.tree_util.tree_map_with_path(grow, llama.init_params(jax.random.key(seed), CFG))


@pytest.fixture(scope="module")
def params():
    return lively_params()


@pytest.fixture(scope="module")
def twin(params):
    return hf_twin(params, CFG)


def prompts(batch: int, length: int, seed: int = 0) -> np.ndarray:
    """Token ids avoiding 0..2 (pad/bos/eos of the tiny config)."""
    return np.random.RandomState(seed).randint(3, CFG.vocab_size, (batch, length)).astype(np.int32)


def hf_greedy(model, ids, mask, max_new: int, eos: tuple[int, ...] = (), pad: int = 0):
    """transformers' greedy continuation, padded with ``pad`` to ``max_new`` tokens."""
    config = transformers.GenerationConfig(
        do_sample=False,
        max_new_tokens=max_new,
        eos_token_id=list(eos) or None,
        pad_token_id=pad,
        bos_token_id=None,
    )
    with torch.no_grad():
        out = model.generate(
            torch.tensor(ids, dtype=torch.long),
            attention_mask=torch.tensor(mask, dtype=torch.long),
            generation_config=config,
        )
    new = out[:, ids.shape[1] :].numpy()
    return np.pad(new, ((0, 0), (0, max_new - new.shape[1])), constant_values=pad)


@functools.partial(jax.jit, static_argnames="max_new")
def naive_greedy(params, ids, mask, max_new: int, adapter_ids=None, task_ids=None) -> jax.Array:
    """Greedy decoding by re-running the uncached forward on the whole (growing) sequence."""
    ctx = Context(adapter_ids=adapter_ids, task_ids=task_ids)
    t = ids.shape[1]
    grow = ((0, 0), (0, max_new))
    ids, mask = jnp.pad(jnp.asarray(ids), grow), jnp.pad(jnp.asarray(mask), grow)

    def step(carry, i):
        ids, mask = carry
        logits = llama.forward(params, CFG, ids, attention_mask=mask, ctx=ctx)
        tok = jnp.argmax(jax.lax.dynamic_index_in_dim(logits, t + i - 1, 1, False), axis=-1)
        tok = tok.astype(jnp.int32)
        return (ids.at[:, t + i].set(tok), mask.at[:, t + i].set(1)), tok

    return jax.lax.scan(step, (ids, mask), jnp.arange(max_new))[1].T


def run(params, ids, mask=None, **kw) -> gen.GenerationResult:
    kw.setdefault("stop_tokens", ())
    return gen.generate(
        params, CFG, jnp.asarray(ids), None if mask is None else jnp.asarray(mask), **kw
    )


def test_greedy_single_prompt_matches_transformers(params, twin):
    ids = prompts(1, 7)
    out = run(params, ids, max_new_tokens=10)
    ref = hf_greedy(twin, ids, np.ones_like(ids), 10)
    assert len(set(ref[0].tolist())) > 4, "the random model should not repeat one token"
    np.testing.assert_array_equal(np.asarray(out.tokens), ref)
    np.testing.assert_array_equal(np.asarray(out.lengths), [10])


def test_greedy_left_padded_batch_matches_transformers(params, twin):
    ids = prompts(3, 7, seed=1)
    mask = np.ones_like(ids)
    mask[1, :3] = 0
    mask[2, :5] = 0
    ids[mask == 0] = 0
    out = run(params, ids, mask, max_new_tokens=10)
    np.testing.assert_array_equal(np.asarray(out.tokens), hf_greedy(twin, ids, mask, 10))


def test_stop_tokens_match_transformers(params, twin):
    ids = prompts(2, 5, seed=2)
    mask = np.ones_like(ids)
    mask[0, :2] = 0
    free = hf_greedy(twin, ids, mask, 10)
    eos = int(free[0, 3])
    first = [list(row).index(eos) if eos in row else None for row in free.tolist()]
    out = run(params, ids, mask, max_new_tokens=10, stop_tokens=(eos,), pad_token_id=1)
    ref = hf_greedy(twin, ids, mask, 10, eos=(eos,), pad=1)
    np.testing.assert_array_equal(np.asarray(out.tokens), ref)
    expected = [10 if i is None else i + 1 for i in first]
    np.testing.assert_array_equal(np.asarray(out.lengths), expected)
    assert np.asarray(out.tokens)[0, first[0]] == eos
    assert (np.asarray(out.tokens)[0, first[0] + 1 :] == 1).all()


def test_all_rows_stopped_ends_early_with_padding(params):
    ids = prompts(2, 5, seed=3)
    free = np.asarray(run(params, ids, max_new_tokens=10).tokens)
    stops = (int(free[0, 1]), int(free[1, 2]))
    out = run(params, ids, max_new_tokens=10, stop_tokens=stops, pad_token_id=0)
    ends = [min(row.index(s) for s in stops if s in row) for row in free.tolist()]
    np.testing.assert_array_equal(np.asarray(out.lengths), [e + 1 for e in ends])
    for row, end in enumerate(ends):
        np.testing.assert_array_equal(np.asarray(out.tokens)[row, : end + 1], free[row, : end + 1])
        np.testing.assert_array_equal(np.asarray(out.tokens)[row, end + 1 :], 0)


def test_stop_tokens_default_to_config_eos(params):
    ids = prompts(2, 5, seed=3)
    free = np.asarray(run(params, ids, max_new_tokens=10).tokens)
    eos = int(free[0, 2])
    cfg = tiny_config(eos_token_id=(96, eos), pad_token_id=0)
    out = gen.generate(params, cfg, jnp.asarray(ids), max_new_tokens=10)
    first = free[0].tolist().index(eos)
    assert int(out.lengths[0]) == first + 1
    np.testing.assert_array_equal(np.asarray(out.tokens)[0, first + 1 :], 0)


def test_max_new_tokens_truncates_the_same_continuation(params):
    ids = prompts(2, 5, seed=4)
    full = np.asarray(run(params, ids, max_new_tokens=10).tokens)
    np.testing.assert_array_equal(full, naive_greedy(params, ids, np.ones_like(ids), 10))
    for max_new in (1, 3):
        out = run(params, ids, max_new_tokens=max_new)
        np.testing.assert_array_equal(np.asarray(out.tokens), full[:, :max_new])
        np.testing.assert_array_equal(np.asarray(out.lengths), [max_new, max_new])


def test_incremental_decode_equals_full_forward(params):
    """Right- and left-padded prompts, then tokens one by one, vs one uncached pass."""
    ids = prompts(2, 6, seed=5)
    mask = np.ones_like(ids)
    mask[0, 4:] = 0  # right padding: the pad slots stay between prompt and new tokens
    mask[1, :2] = 0
    more = prompts(2, 4, seed=6)
    full_ids = jnp.asarray(np.concatenate([ids, more], axis=1))
    full_mask = jnp.asarray(np.concatenate([mask, np.ones_like(more)], axis=1))
    full = np.asarray(llama.forward(params, CFG, full_ids, attention_mask=full_mask))
    prefill = jax.jit(gen.prefill, static_argnums=1)
    decode_step = jax.jit(gen.decode_step, static_argnums=1, donate_argnums=3)
    cache = KVCache.create(CFG, 2, 10)
    logits, cache = prefill(params, CFG, jnp.asarray(ids), jnp.asarray(mask), cache)
    steps = [np.asarray(logits)]
    for j in range(more.shape[1]):
        logits, cache = decode_step(params, CFG, jnp.asarray(more[:, j]), cache)
        steps.append(np.asarray(logits))
    got = np.stack(steps, axis=1)
    want = np.stack([full[[0, 1], [3, 5]], *(full[:, 6 + j] for j in range(4))], axis=1)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5 * np.abs(want).max())


def test_right_padded_rows_equal_each_row_alone(params):
    ids = prompts(3, 7, seed=7)
    mask = np.ones_like(ids)
    mask[0, 4:] = 0
    mask[2, 4:] = 0
    ids[mask == 0] = 0
    out = np.asarray(run(params, ids, mask, max_new_tokens=10).tokens)
    for row in range(3):
        alone = ids[row : row + 1, : mask[row].sum()]
        np.testing.assert_array_equal(out[row], run(params, alone, max_new_tokens=10).tokens[0])


def test_sampling_is_deterministic_per_key(params):
    ids = prompts(2, 5, seed=8)
    kw = dict(max_new_tokens=10, temperature=1.0, top_p=0.9)
    a = run(params, ids, rng=jax.random.key(1), **kw)
    b = run(params, ids, rng=jax.random.key(1), **kw)
    c = run(params, ids, rng=jax.random.key(2), **kw)
    np.testing.assert_array_equal(np.asarray(a.tokens), np.asarray(b.tokens))
    assert not np.array_equal(np.asarray(a.tokens), np.asarray(c.tokens))


@pytest.mark.parametrize(
    "kw",
    [dict(temperature=1e-4), dict(temperature=1.0, top_p=1e-6), dict(temperature=5.0, top_k=1)],
)
def test_degenerate_sampling_equals_greedy(params, kw):
    ids = prompts(2, 5, seed=9)
    greedy = run(params, ids, max_new_tokens=10)
    sampled = run(params, ids, max_new_tokens=10, rng=jax.random.key(3), **kw)
    np.testing.assert_array_equal(np.asarray(sampled.tokens), np.asarray(greedy.tokens))


def test_filters_keep_the_expected_tokens():
    logits = jnp.log(jnp.array([[0.1, 0.4, 0.2, 0.3]]))
    assert np.isfinite(sampling.top_k_filter(logits, 2)).tolist() == [[False, True, False, True]]
    kept = np.isfinite(sampling.top_p_filter(logits, 0.65)).tolist()
    assert kept == [[False, True, False, True]]
    draws = jax.vmap(lambda k: sampling.sample(k, logits, top_p=0.65))(
        jax.random.split(jax.random.key(0), 200)
    )
    assert set(np.asarray(draws).ravel().tolist()) == {1, 3}


def test_compiles_once_per_shape(params, monkeypatch):
    traces = []
    step = gen.decode_step

    def counting_step(*args, **kwargs):
        traces.append(1)
        return step(*args, **kwargs)

    monkeypatch.setattr(gen, "decode_step", counting_step)
    shape = (3, 11)  # used by no other test, so the first call must trace
    run(params, prompts(*shape, seed=10), max_new_tokens=5, stop_tokens=(7,))
    assert len(traces) == 1
    run(params, prompts(*shape, seed=11), max_new_tokens=5, stop_tokens=(9,), pad_token_id=2)
    assert len(traces) == 1
    for seed, temperature in ((0, 0.7), (1, 1.3)):
        kw = dict(temperature=temperature, top_p=0.8, rng=jax.random.key(seed))
        run(params, prompts(*shape, seed=seed), max_new_tokens=5, **kw)
    assert len(traces) == 2


@node(trainable=("table",))
class TaskPrompt(Node):
    """Test-only soft prompt: one ``[n, hidden]`` table per task, picked by ``ctx.task_ids``."""

    table: jax.Array


@hooks.prompt_embeddings.register(TaskPrompt)
def _task_prompt(node_: TaskPrompt, batch_size: int, ctx: Context) -> jax.Array:
    return node_.table[ctx.task_ids]


@node(trainable=("gain",))
class RowGain(Node):
    """Test-only projection: the base matmul scaled by a per-adapter gain (``ctx.adapter_ids``)."""

    base: jax.Array
    gain: jax.Array

    def adapter_indices(self) -> tuple[int, ...]:
        return tuple(range(self.gain.shape[-1]))  # what ids are checked against


@matmul.register(RowGain)
def _row_gain(w: RowGain, x: jax.Array, ctx: Context, name: str) -> jax.Array:
    return matmul(w.base, x, ctx, name) * w.gain[ctx.adapter_ids][:, None, None]


@dense.register(RowGain)
def _row_gain_dense(w: RowGain) -> jax.Array:
    return dense(w.base)


def test_soft_prompt_and_per_row_ids_pass_through(params):
    """Virtual tokens take cache slots; task and adapter ids reach every forward call."""
    table = 3.0 * jax.random.normal(jax.random.key(4), (2, 3, CFG.hidden_size))
    kernel = params["layers"]["mlp"]["down_proj"]["kernel"]
    gains = jnp.array([[1.0, 0.3]] * CFG.num_hidden_layers)  # leading layer axis
    layers = {**params["layers"], "mlp": {**params["layers"]["mlp"]}}
    layers["mlp"]["down_proj"] = {"kernel": RowGain(kernel, gains)}
    peft = {**params, "layers": layers, "prompt": TaskPrompt(table)}
    ids = prompts(2, 5, seed=12)
    mask = np.ones_like(ids)
    mask[0, :2] = 0
    rows = dict(adapter_ids=jnp.array([0, 1]), task_ids=jnp.array([1, 0]))
    assert gen.virtual_tokens(peft, 2, Context(task_ids=rows["task_ids"])) == 3
    out = run(peft, ids, mask, max_new_tokens=8, **rows)
    want = naive_greedy(peft, ids, mask, 8, **rows)
    np.testing.assert_array_equal(np.asarray(out.tokens), want)
    assert not np.array_equal(want, naive_greedy(params, ids, mask, 8))


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        (dict(max_new_tokens=0), "max_new_tokens"),
        (dict(max_new_tokens=2, temperature=1.0), "rng"),
        (dict(max_new_tokens=2, top_p=0.0), "top_p"),
        (dict(max_new_tokens=2, top_k=-1), "top_k"),
        (dict(max_new_tokens=2, temperature=-1.0), "temperature"),
        (dict(max_new_tokens=2, attention_mask=np.ones((2, 3))), "attention_mask"),
        (dict(max_new_tokens=2, attention_mask=np.array([[1, 1, 1, 1], [0, 0, 0, 0]])), "rows"),
        (dict(max_new_tokens=2, task_ids=jnp.zeros(3, jnp.int32)), "task_ids"),
    ],
)
def test_bad_arguments_raise(params, kw, match):
    with pytest.raises(ValueError, match=match):
        gen.generate(params, CFG, jnp.ones((2, 4), jnp.int32), **kw)
