"""Fast decoding: prompt-length buckets, LoRA merged once per call, default compute dtype.

The reference is the uncached, unmerged forward re-run on the growing sequence
(``naive_greedy`` from tests/test_generate.py): greedy tokens must be identical.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest
from test_generate import CFG, lively_params, naive_greedy, prompts

import jpeft
from jpeft.lora import LoRAWeight
from jpeft.models import generate as gen
from jpeft.models.context import compute_dtype

COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"  # one per XLA compilation
LORA = jpeft.LoRA(r=4, alpha=8, targets="all-linear")


def with_lora(params, seed: int = 0):
    """``params`` under LoRA with random nonzero B, so the adapters change the tokens."""
    return randomized(LORA.init(jax.random.key(seed), params, CFG), seed)


def randomized(params, seed: int, scale: float = 0.5):
    """Every LoRA adapter's B drawn at random (LoRA starts with B = 0)."""
    rs = np.random.RandomState(seed)

    def fill(x):
        if not isinstance(x, LoRAWeight):
            return x
        adapters = tuple(
            dataclasses.replace(ad, b=jnp.asarray(scale * rs.randn(*ad.b.shape), jnp.float32))
            for ad in x.adapters
        )
        return LoRAWeight(x.base, adapters)

    return jax.tree.map(fill, params, is_leaf=lambda x: isinstance(x, LoRAWeight))


def is_lora(x) -> bool:
    return isinstance(x, LoRAWeight)


@pytest.fixture(scope="module")
def params():
    return lively_params()


def padded_batch(seed: int) -> tuple[np.ndarray, np.ndarray]:
    """5 left-padded rows (a batch bucket of 6) of 9, 5, 9, 3 and 1 tokens."""
    ids = prompts(5, 9, seed=seed)
    mask = np.ones_like(ids)
    mask[1, :4] = 0
    mask[3, :6] = 0
    mask[4, :8] = 0
    ids[mask == 0] = 0
    return ids, mask


METHODS = {
    "base": lambda key, p: p,
    "prefix": lambda key, p: jpeft.PrefixTuning(num_virtual_tokens=3).init(key, p, CFG),
    "soft prompt": lambda key, p: jpeft.PromptTuning(num_virtual_tokens=4).init(key, p, CFG),
}


@pytest.mark.parametrize("lora", [False, True], ids=["no lora", "lora"])
@pytest.mark.parametrize("method", list(METHODS))
def test_greedy_tokens_equal_the_uncached_unmerged_path(params, method, lora):
    """Bucketed prompt and batch, merged LoRA: the same tokens as the plain forward."""
    peft = METHODS[method](jax.random.key(3), params)
    if lora:
        peft = with_lora(peft)
    ids, mask = padded_batch(seed=20)
    out = gen.generate(peft, CFG, ids, mask, max_new_tokens=8, stop_tokens=())
    want = np.asarray(naive_greedy(peft, ids, mask, 8))
    np.testing.assert_array_equal(np.asarray(out.tokens), want)
    assert out.tokens.shape == (5, 8)
    if method != "base" or lora:  # the method changes the continuation
        assert not np.array_equal(want, naive_greedy(params, ids, mask, 8))


def test_twenty_prompt_lengths_compile_two_programs(params):
    """Prompt lengths 1..20 fall in two buckets (16 and 24 tokens): two compilations."""
    compiled: list[str] = []

    def listen(event: str, duration: float, **kwargs) -> None:
        if event == COMPILE_EVENT:
            compiled.append(kwargs.get("fun_name", "?"))

    jax.monitoring.register_event_duration_secs_listener(listen)
    try:
        for length in range(1, 21):
            # max_new_tokens=7 is used by no other test, so no program is cached yet
            gen.generate(params, CFG, prompts(2, length, seed=length), max_new_tokens=7)
    finally:
        jax.monitoring.unregister_event_duration_listener(listen)
    assert compiled == ["jit(_generate)"] * 2


def test_bucket_lengths_and_one_compile_per_bucket(params):
    lengths = list(range(1, 21))
    buckets = {gen.bucket(n, gen.PROMPT_BUCKET) for n in lengths}
    assert buckets == {16, 24}
    sizes = [gen.bucket(n) for n in range(1, 4097)]
    assert len(set(sizes)) == 24 and all(n <= s < 1.5 * n or s <= 3 for n, s in enumerate(sizes, 1))


def test_lora_is_merged_once_per_call_and_params_stay_unmerged(params):
    """The decode loop of merged LoRA runs the base model's matmuls; the params keep LoRA."""
    peft = with_lora(params)
    ids = jnp.asarray(prompts(2, 5, seed=21))
    mask = jnp.ones_like(ids)
    loop_dots = {}
    for name, p, merge in (("base", params, True), ("merged", peft, True), ("lora", peft, False)):
        jaxpr = jax.make_jaxpr(
            lambda p, merge=merge: gen._generate(
                p,
                ids,
                mask,
                jnp.ones(2, bool),
                jnp.zeros(1, jnp.int32),
                0,
                0.0,
                1.0,
                None,
                None,
                None,
                cfg=CFG,
                max_new_tokens=4,
                is_greedy=True,
                top_k=0,
                use_top_p=False,
                dtype=jnp.float32,
                merge=merge,
            )
        )(p)
        loop_dots[name] = _dots_in_while(jaxpr.jaxpr)
    assert loop_dots["merged"] == loop_dots["base"] < loop_dots["lora"]
    assert any(map(is_lora, jax.tree.leaves(peft, is_leaf=is_lora)))


def _dots_in_while(jaxpr, inside: bool = False) -> int:
    """``dot_general`` equations inside ``while`` loops (the token loop and its layer scan)."""
    total = 0
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "dot_general" and inside:
            total += 1
        for value in eqn.params.values():
            for sub in value if isinstance(value, tuple) else (value,):
                sub = getattr(sub, "jaxpr", sub)
                if isinstance(sub, jax.extend.core.Jaxpr):
                    total += _dots_in_while(sub, inside or eqn.primitive.name == "while")
    return total


def test_merge_keeps_what_would_grow(params):
    """LoRA over a plain base merges; over NF4 it stays (a dense weight would be bigger)."""
    merged = gen.merge_for_decoding(with_lora(params))
    assert not any(map(is_lora, jax.tree.leaves(merged, is_leaf=is_lora)))
    qlora = jpeft.QLoRA(r=4, alpha=8, targets="all-linear", blocksize=32)
    qlora = qlora.init(jax.random.key(0), params, CFG)
    kept = gen.merge_for_decoding(qlora)
    kernel = kept["layers"]["self_attn"]["q_proj"]["kernel"]
    assert is_lora(kernel) and kernel.base is qlora["layers"]["self_attn"]["q_proj"]["kernel"].base


def test_mixed_adapter_batch_keeps_unmerged_path(params):
    """With adapter_ids each row gets its own adapter: the same tokens as the plain forward."""
    two = jpeft.LoRA(r=4, alpha=8, targets="all-linear", adapter_name="second")
    peft = randomized(two.init(jax.random.key(1), with_lora(params), CFG), seed=1)
    ids, mask = padded_batch(seed=22)
    rows = jnp.array([0, 1, -1, 1, 0], jnp.int32)
    out = gen.generate(peft, CFG, ids, mask, max_new_tokens=6, stop_tokens=(), adapter_ids=rows)
    want = naive_greedy(peft, ids, mask, 6, adapter_ids=rows)
    np.testing.assert_array_equal(np.asarray(out.tokens), np.asarray(want))


def test_default_compute_dtype_follows_the_backend(monkeypatch):
    assert compute_dtype() == jnp.float32 and compute_dtype("auto") == jnp.float32
    assert compute_dtype("bfloat16") == jnp.bfloat16
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    assert compute_dtype() == jnp.bfloat16 and compute_dtype(jnp.float16) == jnp.float16
