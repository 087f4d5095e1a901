"""The KV cache is updated in place: the compiled decode step aliases the donated cache
and holds no cache-sized copy, for every PEFT method that decodes.

The cache-sized buffers are counted in the optimized (CPU) HLO by the same function
that ``bench/decode_memory.py`` uses for the H100 program.
"""

from __future__ import annotations

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

from decode_memory import cache_buffers, cache_copies

ROWS = 3


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
    assert not cache_copies(counts), counts
    _, new = compiled(peft, cache, tokens, adapter_ids)
    assert cache.k.is_deleted() and cache.v.is_deleted()  # donated, reused for the output
    assert int(new.length) == 1


def test_counting_finds_the_copies_of_a_restacked_cache():
    """The per-layer slice-and-restack that decoding used before leaves cache copies."""
    cache = KVCache.create(CFG, ROWS, 24)

    def restacked(k: jax.Array, new: jax.Array) -> jax.Array:
        def layer(_, k_layer):
            return None, jax.lax.dynamic_update_slice(k_layer, new, (0, 5, 0, 0))

        return jax.lax.scan(layer, None, k)[1]

    new = jnp.ones((ROWS, 1, *cache.k.shape[3:]))
    compiled = jax.jit(restacked, donate_argnums=0).lower(cache.k, new).compile()
    assert cache_copies(cache_buffers(compiled.as_text(), cache))
