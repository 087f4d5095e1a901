"""Prompt-learning methods against peft 0.21 on tiny random LLaMAs (MHA and GQA).

peft is the oracle for every number: its adapter files load into jpeft and ours into
peft with the same logits on the real-token positions; peft's own encoders (P-tuning
MLP/LSTM, prefix projection) match ours given the same weights. Generation is
compared with a greedy loop over peft's full forward: peft 0.21's ``generate`` reads
the KV cache from ``past_key_values``, which transformers 5 renamed to ``cache``, so
with this transformers it drops the prefix / re-injects the soft prompt while decoding.
"""

import copy
import functools

import jax
import jax.numpy as jnp
import numpy as np
import peft
import pytest
import torch
from conftest import hf_twin, tiny_config

import jpeft
from jpeft.models import llama
from jpeft.models.context import Context
from jpeft.models.generate import generate
from jpeft.prompts import encoders
from jpeft.prompts.nodes import MultitaskPrompt, Prefix, ProjectedPrefix, PromptEncoder, SoftPrompt

ARCHS = {"mha": {"num_key_value_heads": 4}, "gqa": {}}
TASKS = np.array([2, 0], np.int32)
N = 3  # virtual tokens everywhere, so compiled forwards are shared between tests


@functools.cache
def _setup(arch):
    cfg = tiny_config(**ARCHS[arch])
    params = llama.init_params(jax.random.key(0), cfg)
    rs = np.random.RandomState(0)
    ids = rs.randint(0, cfg.vocab_size, (2, 9)).astype(np.int32)
    mask = np.ones((2, 9), np.int32)
    mask[1, 6:] = 0
    return cfg, params, ids, mask


@functools.cache
def _base_twin(arch):
    cfg, params, _, _ = _setup(arch)
    return hf_twin(params, cfg)


def _twin(arch):
    return copy.deepcopy(_base_twin(arch))


@functools.partial(jax.jit, static_argnames="cfg")
def _forward(params, ids, mask, positions, tasks, *, cfg):
    ctx = Context(task_ids=tasks)
    return llama.forward(params, cfg, ids, attention_mask=mask, position_ids=positions, ctx=ctx)


def _ours(params, cfg, ids, mask, position_ids=None):
    tasks = jnp.asarray(TASKS[: len(ids)]) if _multitask(params) else None
    positions = None if position_ids is None else jnp.asarray(position_ids)
    return np.asarray(
        _forward(params, jnp.asarray(ids), jnp.asarray(mask), positions, tasks, cfg=cfg)
    )


def _multitask(params):
    return isinstance(params.get("prompt"), MultitaskPrompt)


def _peft(model, ids, mask, multitask=False, **kwargs):
    """peft's logits, without the virtual positions it returns for soft prompts."""
    if multitask:
        kwargs["task_ids"] = torch.tensor(TASKS[: len(ids)])
    with torch.no_grad():
        out = model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), **kwargs)
    return out.logits.numpy()[:, -ids.shape[1] :]


def _assert_close(out, ref, mask):
    valid = mask.astype(bool)
    err = np.abs(out - ref)[valid].max() / np.abs(ref[valid]).max()
    assert err < 1e-5, err


SOFT = [
    jpeft.PromptTuning(num_virtual_tokens=N),
    jpeft.PromptTuning(num_virtual_tokens=N, prompt_init="SAMPLE_VOCAB"),
    jpeft.PromptTuning(num_virtual_tokens=N, prompt_init="TEXT", init_token_ids=(5, 9)),
    jpeft.PTuning(num_virtual_tokens=N, encoder_hidden_size=8),
    jpeft.PTuning(num_virtual_tokens=N, encoder_type="LSTM", encoder_hidden_size=8),
    jpeft.MultitaskPromptTuning(num_virtual_tokens=N, num_tasks=3, num_ranks=2),
]
PREFIX = [
    jpeft.PrefixTuning(num_virtual_tokens=N, encoder_hidden_size=8),
    jpeft.PTuningV2(num_virtual_tokens=N),
]
# soft prompts do not touch attention: one architecture is enough for them
CASES = [(m, "gqa") for m in SOFT] + [(m, "gqa") for m in PREFIX] + [(PREFIX[1], "mha")]


@pytest.mark.parametrize("method, arch", CASES, ids=lambda x: repr(x)[:40])
def test_peft_loads_ours(method, arch, tmp_path):
    cfg, params, ids, mask = _setup(arch)
    adapted = method.init(jax.random.key(1), params, cfg)
    jpeft.save_hf_adapter(tmp_path, method, adapted, cfg)
    model = peft.PeftModel.from_pretrained(_twin(arch), tmp_path).eval()
    ref = _peft(model, ids, mask, multitask=_multitask(adapted))
    _assert_close(_ours(adapted, cfg, ids, mask), ref, mask)


PEFT_CONFIGS = [
    (peft.PromptTuningConfig, {}, "gqa"),
    (peft.PromptEncoderConfig, {"encoder_hidden_size": 8}, "gqa"),
    (
        peft.PromptEncoderConfig,
        {"encoder_reparameterization_type": "LSTM", "encoder_hidden_size": 8},
        "gqa",
    ),
    (peft.MultitaskPromptTuningConfig, {"num_tasks": 3, "num_ranks": 2}, "gqa"),
    (peft.PrefixTuningConfig, {"prefix_projection": True, "encoder_hidden_size": 8}, "gqa"),
    (peft.PrefixTuningConfig, {"prefix_projection": True, "encoder_hidden_size": 8}, "mha"),
]
LOADED_NODE = {
    "PROMPT_TUNING": SoftPrompt,
    "P_TUNING": SoftPrompt,
    "PREFIX_TUNING": Prefix,
    "MULTITASK_PROMPT_TUNING": MultitaskPrompt,
}


@pytest.mark.parametrize("config_cls, options, arch", PEFT_CONFIGS, ids=lambda x: repr(x)[-24:])
def test_we_load_peft(config_cls, options, arch, tmp_path):
    """peft trains with its encoders; the saved encoder output gives the same logits here."""
    cfg, params, ids, mask = _setup(arch)
    torch.manual_seed(0)
    config = config_cls(task_type="CAUSAL_LM", num_virtual_tokens=N, **options)
    model = peft.get_peft_model(_twin(arch), config).eval()
    multitask = config.peft_type == "MULTITASK_PROMPT_TUNING"
    if multitask:  # peft starts the task factors at N(0, 0.02); make the tasks differ more
        model.prompt_encoder.default.prefix_task_cols.data.normal_()
    ref = _peft(model, ids, mask, multitask=multitask)
    model.save_pretrained(tmp_path)
    method, loaded = jpeft.load_hf_adapter(tmp_path, params, cfg)
    assert method.peft_type == config.peft_type
    entry = "prefix" if config.peft_type == "PREFIX_TUNING" else "prompt"
    assert type(loaded[entry]) is LOADED_NODE[config.peft_type]
    if config.peft_type == "PREFIX_TUNING":
        assert method.prefix_projection is False  # a loaded prefix is never reparameterized
    _assert_close(_ours(loaded, cfg, ids, mask), ref, mask)


@pytest.mark.parametrize("kind", ["MLP", "LSTM"])
def test_ptuning_encoder_matches_peft(kind):
    """Our encoder with peft's weights: the same encoder output and the same logits."""
    cfg, params, ids, mask = _setup("gqa")
    torch.manual_seed(0)
    config = peft.PromptEncoderConfig(
        task_type="CAUSAL_LM",
        num_virtual_tokens=N,
        encoder_reparameterization_type=kind,
        encoder_hidden_size=8,
    )
    model = peft.get_peft_model(_twin("gqa"), config).eval()
    module = model.prompt_encoder.default
    state = {k: v.numpy() for k, v in module.state_dict().items()}
    embedding = jnp.asarray(state["embedding.weight"])
    ours = PromptEncoder(embedding, encoders.from_torch(state, kind), kind, 0.0)
    with torch.no_grad():
        theirs = module(torch.arange(N)[None])[0].numpy()
    np.testing.assert_allclose(np.asarray(ours.table()), theirs, rtol=1e-5, atol=1e-6)
    out = _ours({**params, "prompt": ours}, cfg, ids, mask)
    _assert_close(out, _peft(model, ids, mask), mask)


def test_prefix_projection_matches_peft():
    cfg, params, ids, mask = _setup("gqa")
    torch.manual_seed(0)
    config = peft.PrefixTuningConfig(
        task_type="CAUSAL_LM", num_virtual_tokens=N, prefix_projection=True, encoder_hidden_size=8
    )
    model = peft.get_peft_model(_twin("gqa"), config).eval()
    state = {k: v.numpy() for k, v in model.prompt_encoder.default.state_dict().items()}
    node = ProjectedPrefix(
        jnp.asarray(state["embedding.weight"]),
        encoders.from_torch(state, "PROJECTION"),
        cfg.num_key_value_heads,
        cfg.head_dim,
    )
    out = _ours({**params, "prefix": node}, cfg, ids, mask)
    _assert_close(out, _peft(model, ids, mask), mask)


def test_prefix_left_padding_matches_peft_with_positions(tmp_path):
    """Left padding: peft offsets explicit position_ids by n; our default positions agree."""
    arch = "gqa"
    cfg, params, ids, _ = _setup(arch)
    mask = np.ones_like(ids)
    mask[1, :4] = 0
    positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0).astype(np.int32)
    method = jpeft.PTuningV2(num_virtual_tokens=N)
    adapted = method.init(jax.random.key(1), params, cfg)
    jpeft.save_hf_adapter(tmp_path, method, adapted, cfg)
    model = peft.PeftModel.from_pretrained(_twin(arch), tmp_path).eval()
    ref = _peft(model, ids, mask, position_ids=torch.tensor(positions))
    _assert_close(_ours(adapted, cfg, ids, mask, positions), ref, mask)
    _assert_close(_ours(adapted, cfg, ids, mask), ref, mask)


def _peft_greedy(model, ids, mask, steps, multitask=False):
    """Greedy decoding by re-running peft's full forward (no cache) on the growing batch."""
    out = []
    for _ in range(steps):
        token = _peft(model, ids, mask, multitask=multitask)[:, -1].argmax(-1).astype(np.int32)
        out.append(token)
        ids = np.concatenate([ids, token[:, None]], axis=1)
        mask = np.concatenate([mask, np.ones_like(mask[:, :1])], axis=1)
    return np.stack(out, axis=1)


@pytest.mark.parametrize(
    "method, left_pad",
    [
        (jpeft.PromptTuning(num_virtual_tokens=N), 0),  # peft drops position_ids: no padding
        (jpeft.PrefixTuning(num_virtual_tokens=N, encoder_hidden_size=8), 3),
    ],
    ids=lambda x: repr(x)[:30],
)
def test_greedy_generation_matches_peft(method, left_pad, tmp_path):
    cfg, params, ids, _ = _setup("gqa")
    ids = ids[:, :7]
    mask = np.ones_like(ids)
    mask[1, :left_pad] = 0
    adapted = method.init(jax.random.key(1), params, cfg)
    jpeft.save_hf_adapter(tmp_path, method, adapted, cfg)
    model = peft.PeftModel.from_pretrained(_twin("gqa"), tmp_path).eval()
    multitask = _multitask(adapted)
    ref = _peft_greedy(model, ids, mask, 5, multitask)
    tasks = jnp.asarray(TASKS) if multitask else None
    out = generate(adapted, cfg, ids, mask, max_new_tokens=5, stop_tokens=(), task_ids=tasks)
    np.testing.assert_array_equal(np.asarray(out.tokens), ref)
