"""The KV cache is updated in place: the compiled decode step aliases the donated cache
and holds no cache-sized copy, for every PEFT method that decodes.

The cache-sized buffers are counted in the optimized (CPU) HLO by the same function
that ``bench/decode_memory.py`` uses for the H100 program. The CPU compiler needs no
relayout for a dot, so the GPU's transposes of the cache under grouped-query attention
are checked one level up: in the traced program, the attention dots must take each
layer's keys/values with their batch axes leading, as stored (``CFG`` is GQA: 4 query
heads over 2 key/value heads).
"""

from __future__ import annotations

import collections
import dataclasses
import pathlib
import sys

import jax
import jax.numpy as jnp
import pytest
from test_decode import randomized, with_lora
from test_generate import CFG, lively_params

import jpeft
from jpeft.adapters import LlamaAdapter
from jpeft.models import generate as gen
from jpeft.models.cache import KVCache
from jpeft.models.context import Context

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "bench"))

from decode_memory import cache_buffers, cache_copies, cache_extent

ROWS = 3
# XLA:CPU gives its dot a layer's keys and values (a dynamic slice of the stacked cache,
# seen as a fusion whose root is a bitcast) as a buffer of their own, per layer: one cache's
# worth per step, on CPU only (the H100 program reads them in place, bench/decode_memory.py;
# main's CPU step made the same two copies, as transposes). All-layers copies stay 0.
CPU_LAYER_OPERANDS = collections.Counter({"bitcast (one layer)": 2})


def _two_adapters(key, params):
    second = jpeft.LoRA(r=4, alpha=8, targets="all-linear", adapter_name="second")
    return randomized(second.init(key, with_lora(params), CFG), seed=1)


METHODS = {
    "base": lambda key, p: p,
    "prefix": lambda key, p: jpeft.PrefixTuning(num_virtual_tokens=3).init(key, p, CFG),
    "soft prompt": lambda key, p: jpeft.PromptTuning(num_virtual_tokens=4).init(key, p, CFG),
    "llama-adapter": lambda key, p: LlamaAdapter(adapter_len=4, adapter_layers=2).init(key, p, CFG),
    "two lora adapters": _two_adapters,
}


@pytest.fixture(scope="module")
def params():
    return lively_params()


@pytest.mark.parametrize("method", list(METHODS))
def test_decode_step_updates_the_donated_cache_in_place(params, method):
    peft = METHODS[method](jax.random.key(4), params)
    adapter_ids = jnp.array([0, 1, -1], jnp.int32) if method == "two lora adapters" else None

    def step(p, cache, tokens, ids):
        return gen.decode_step(p, CFG, tokens, cache, Context(adapter_ids=ids))

    # A cache after prefill (soft prompts are prepended by the prefill call only).
    cache = dataclasses.replace(KVCache.create(CFG, ROWS, 24), started=True)
    tokens = jnp.array([3, 4, 5], jnp.int32)
    compiled = jax.jit(step, donate_argnums=1).lower(peft, cache, tokens, adapter_ids).compile()

    assert compiled.memory_analysis().alias_size_in_bytes >= cache.k.nbytes + cache.v.nbytes
    counts = cache_buffers(compiled.as_text(), cache)
    assert counts["dynamic-update-slice (all layers)"] == 2  # the new keys, the new values
    assert not cache_copies(counts) - CPU_LAYER_OPERANDS, counts
    _, new = compiled(peft, cache, tokens, adapter_ids)
    assert cache.k.is_deleted() and cache.v.is_deleted()  # donated, reused for the output
    assert int(new.length) == 1


def _equations(jaxpr):
    """Every equation of a jaxpr and of the jaxprs inside it (scan and loop bodies)."""
    for eqn in jaxpr.eqns:
        yield eqn
        for param in eqn.params.values():
            for sub in param if isinstance(param, tuple | list) else (param,):
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    yield from _equations(inner)


@pytest.mark.parametrize("method", ["base", "prefix"])
def test_gqa_attention_reads_the_cache_as_stored(params, method):
    """Both attention dots batch over the cache layer's leading [B, K] axes; nothing
    transposes or concatenates a cache-sized array (prefix keys are merged by LSE)."""
    peft = METHODS[method](jax.random.key(4), params)
    cache = dataclasses.replace(KVCache.create(CFG, ROWS, 24), started=True)
    tokens = jnp.array([3, 4, 5], jnp.int32)
    jaxpr = jax.make_jaxpr(lambda p, c, t: gen.decode_step(p, CFG, t, c))(peft, cache, tokens)
    layer = cache.k.shape[1:]
    cache_dots = 0
    for eqn in _equations(jaxpr.jaxpr):
        if eqn.primitive.name in ("transpose", "concatenate"):
            assert not cache_extent(eqn.outvars[0].aval.shape, cache), eqn
        if eqn.primitive.name == "dot_general":
            _, batch = eqn.params["dimension_numbers"]
            for operand, dims in zip(eqn.invars, batch, strict=True):
                if operand.aval.shape == layer:
                    assert tuple(dims) == (0, 1), eqn
                    cache_dots += 1
    assert cache_dots == 2  # scores and values, in the layer scan's body


def test_counting_finds_the_copies_of_a_restacked_cache():
    """The per-layer slice-and-restack that decoding used before leaves cache copies."""
    cache = KVCache.create(CFG, ROWS, 24)

    def restacked(k: jax.Array, new: jax.Array) -> jax.Array:
        def layer(_, k_layer):
            return None, jax.lax.dynamic_update_slice(k_layer, new, (0, 0, 5, 0))

        return jax.lax.scan(layer, None, k)[1]

    new = jnp.ones((ROWS, cache.k.shape[2], 1, cache.k.shape[4]))
    compiled = jax.jit(restacked, donate_argnums=0).lower(cache.k, new).compile()
    assert cache_copies(cache_buffers(compiled.as_text(), cache))
