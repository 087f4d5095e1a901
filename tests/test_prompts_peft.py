"""Prompt-learning methods against peft 0.21 on tiny random LLaMAs (MHA and GQA).

peft is the oracle for every number: its adapter files load into jpeft and ours into
peft with the same logits on the real-token positions; peft's own encoders (P-tuning
MLP/LSTM, prefix projection) match ours given the same weights. Generation is
compared with a greedy loop over peft's full forward: peft 0.21's ``generate`` reads
the KV cache from ``past_key_values``, which transformers 5 renamed to ``cache``, so
with this transformers it drops the prefix / re-injects the soft prompt while decoding.
"""

import jax
import jax.numpy as jnp
import numpy as np
import peft
import pytest
import torch
from conftest import hf_twin, tiny_config

import jpeft
from jpeft.prompts import encoders
from jpeft.prompts.nodes import Prefix, ProjectedPrefix, PromptEncoder, SoftPrompt
from models import llama
from models.context import Context
from models.generate import generate

ARCHS = {"mha": {"num_key_value_heads": 4}, "gqa": {}}
TASKS = np.array([2, 0], np.int32)

METHODS = [
    jpeft.PromptTuning(num_virtual_tokens=3),
    jpeft.PromptTuning(num_virtual_tokens=4, prompt_init="SAMPLE_VOCAB"),
    jpeft.PromptTuning(num_virtual_tokens=5, prompt_init="TEXT", init_token_ids=(5, 9)),
    jpeft.PTuning(num_virtual_tokens=3, encoder_hidden_size=8),
    jpeft.PTuning(num_virtual_tokens=3, encoder_type="LSTM", encoder_hidden_size=8),
    jpeft.PrefixTuning(num_virtual_tokens=3, encoder_hidden_size=8),
    jpeft.PTuningV2(num_virtual_tokens=4),
    jpeft.MultitaskPromptTuning(num_virtual_tokens=3, num_tasks=3, num_ranks=2),
]


def _setup(arch):
    cfg = tiny_config(**ARCHS[arch])
    params = llama.init_params(jax.random.key(0), cfg)
    rs = np.random.RandomState(0)
    ids = rs.randint(0, cfg.vocab_size, (2, 9)).astype(np.int32)
    mask = np.ones((2, 9), np.int32)
    mask[1, 6:] = 0
    return cfg, params, ids, mask


def _ours(params, cfg, ids, mask, position_ids=None):
    ctx = Context(task_ids=jnp.asarray(TASKS[: len(ids)])) if _multitask(params) else None
    out = llama.forward(
        params,
        cfg,
        jnp.asarray(ids),
        attention_mask=jnp.asarray(mask),
        position_ids=None if position_ids is None else jnp.asarray(position_ids),
        ctx=ctx,
    )
    return np.asarray(out)


def _multitask(params):
    return type(params.get("prompt")).__name__ == "MultitaskPrompt"


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


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("method", METHODS, ids=lambda m: repr(m)[:40])
def test_peft_loads_ours(arch, method, tmp_path):
    cfg, params, ids, mask = _setup(arch)
    adapted = method.init(jax.random.key(1), params, cfg)
    jpeft.save_hf_adapter(tmp_path, method, adapted, cfg)
    model = peft.PeftModel.from_pretrained(hf_twin(params, cfg), tmp_path).eval()
    ref = _peft(model, ids, mask, multitask=_multitask(adapted))
    _assert_close(_ours(adapted, cfg, ids, mask), ref, mask)


PEFT_CONFIGS = [
    (peft.PromptTuningConfig, {}),
    (peft.PromptEncoderConfig, {"encoder_hidden_size": 8}),
    (
        peft.PromptEncoderConfig,
        {"encoder_reparameterization_type": "LSTM", "encoder_hidden_size": 8},
    ),
    (peft.PrefixTuningConfig, {"prefix_projection": True, "encoder_hidden_size": 8}),
    (peft.PrefixTuningConfig, {"num_virtual_tokens": 4}),
    (peft.MultitaskPromptTuningConfig, {"num_tasks": 3, "num_ranks": 2}),
]
LOADED_NODE = {
    "PROMPT_TUNING": SoftPrompt,
    "P_TUNING": SoftPrompt,
    "PREFIX_TUNING": Prefix,
    "MULTITASK_PROMPT_TUNING": jpeft.prompts.MultitaskPrompt,
}


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("config_cls, options", PEFT_CONFIGS, ids=lambda x: repr(x)[-30:])
def test_we_load_peft(arch, config_cls, options, tmp_path):
    """peft trains with its encoders; the saved encoder output gives the same logits here."""
    cfg, params, ids, mask = _setup(arch)
    torch.manual_seed(0)
    config = config_cls(task_type="CAUSAL_LM", **{"num_virtual_tokens": 3, **options})
    model = peft.get_peft_model(hf_twin(params, cfg), config).eval()
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
        num_virtual_tokens=4,
        encoder_reparameterization_type=kind,
        encoder_hidden_size=8,
        encoder_num_layers=3 if kind == "LSTM" else 2,
    )
    model = peft.get_peft_model(hf_twin(params, cfg), config).eval()
    module = model.prompt_encoder.default
    state = {k: v.numpy() for k, v in module.state_dict().items()}
    ours = PromptEncoder(
        jnp.asarray(state["embedding.weight"]), encoders.from_torch(state, kind), kind, 0.0
    )
    with torch.no_grad():
        theirs = module(torch.arange(4)[None])[0].numpy()
    np.testing.assert_allclose(np.asarray(ours.table()), theirs, rtol=1e-5, atol=1e-6)
    out = _ours({**params, "prompt": ours}, cfg, ids, mask)
    _assert_close(out, _peft(model, ids, mask), mask)


def test_prefix_projection_matches_peft():
    cfg, params, ids, mask = _setup("gqa")
    torch.manual_seed(0)
    config = peft.PrefixTuningConfig(
        task_type="CAUSAL_LM", num_virtual_tokens=3, prefix_projection=True, encoder_hidden_size=12
    )
    model = peft.get_peft_model(hf_twin(params, cfg), config).eval()
    state = {k: v.numpy() for k, v in model.prompt_encoder.default.state_dict().items()}
    node = ProjectedPrefix(
        jnp.asarray(state["embedding.weight"]),
        encoders.from_torch(state, "PROJECTION"),
        cfg.num_key_value_heads,
        cfg.head_dim,
    )
    out = _ours({**params, "prefix": node}, cfg, ids, mask)
    _assert_close(out, _peft(model, ids, mask), mask)


@pytest.mark.parametrize("arch", ARCHS)
def test_prefix_left_padding_matches_peft_with_positions(arch, tmp_path):
    """Left padding: peft offsets explicit position_ids by n; our default positions agree."""
    cfg, params, ids, _ = _setup(arch)
    mask = np.ones_like(ids)
    mask[1, :4] = 0
    positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
    method = jpeft.PTuningV2(num_virtual_tokens=3)
    adapted = method.init(jax.random.key(1), params, cfg)
    jpeft.save_hf_adapter(tmp_path, method, adapted, cfg)
    model = peft.PeftModel.from_pretrained(hf_twin(params, cfg), tmp_path).eval()
    ref = _peft(model, ids, mask, position_ids=torch.tensor(positions))
    _assert_close(_ours(adapted, cfg, ids, mask, positions), ref, mask)
    _assert_close(_ours(adapted, cfg, ids, mask), ref, mask)


def _peft_greedy(model, ids, mask, steps, multitask=False):
    """Greedy decoding by re-running peft's full forward (no cache) on the growing batch."""
    ids, mask = np.asarray(ids), np.asarray(mask)
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
        (jpeft.PromptTuning(num_virtual_tokens=3), 0),  # peft drops position_ids: no padding
        (jpeft.MultitaskPromptTuning(num_virtual_tokens=3, num_tasks=3, num_ranks=2), 0),
        (jpeft.PrefixTuning(num_virtual_tokens=3, encoder_hidden_size=8), 3),
        (jpeft.PTuningV2(num_virtual_tokens=2), 3),
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
    model = peft.PeftModel.from_pretrained(hf_twin(params, cfg), tmp_path).eval()
    multitask = _multitask(adapted)
    ref = _peft_greedy(model, ids, mask, 6, multitask)
    tasks = jnp.asarray(TASKS) if multitask else None
    out = generate(adapted, cfg, ids, mask, max_new_tokens=6, stop_tokens=(), task_ids=tasks)
    np.testing.assert_array_equal(np.asarray(out.tokens), ref)
