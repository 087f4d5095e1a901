"""Several named prompt-learning / LLaMA-Adapter adapters in one tree, against peft 0.21.

peft holds them with ``add_adapter`` / ``load_adapter(adapter_name=...)`` and uses the
one ``set_adapter`` names; its ``save_pretrained`` writes each to its own directory.
Both directions are checked per method: peft's adapters load into one jpeft tree and
give peft's logits for each active adapter; each of ours, saved alone, loads into peft
with our logits. Per-row selection (which peft does not offer here) equals separate runs.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import peft
import pytest
import torch
from conftest import hf_twin
from test_prompts_peft import _setup as prompt_setup

import jpeft
from jpeft.adapters import LlamaAdapter
from jpeft.models import llama
from jpeft.models.context import Context
from jpeft.prompts import named
from jpeft.prompts.nodes import SoftPrompt

N = 3
CASES = {
    "prompt_tuning": (peft.PromptTuningConfig, {}, jpeft.PromptTuning(num_virtual_tokens=N)),
    "p_tuning": (
        peft.PromptEncoderConfig,
        {"encoder_hidden_size": 8},
        jpeft.PTuning(num_virtual_tokens=N, encoder_hidden_size=8),
    ),
    "prefix_tuning": (
        peft.PrefixTuningConfig,
        {"prefix_projection": True, "encoder_hidden_size": 8},
        jpeft.PrefixTuning(num_virtual_tokens=N, encoder_hidden_size=8),
    ),
    "adaption_prompt": (
        peft.AdaptionPromptConfig,
        {"adapter_len": 4, "adapter_layers": 2},
        LlamaAdapter(adapter_len=4, adapter_layers=2),
    ),
}
NAMES = ("one", "two")  # peft warns about names inside its prefixes ("one" in "prefix_tuning_")


def _setup():
    return prompt_setup("gqa")  # 2 layers; LLaMA-Adapter above adapts both


@functools.partial(jax.jit, static_argnames="cfg")
def _forward(params, ids, mask, adapter_ids, *, cfg):
    ctx = Context(adapter_ids=adapter_ids)
    return llama.forward(params, cfg, ids, attention_mask=mask, ctx=ctx)


def _ours(params, ids=None, mask=None, adapter_ids=None):
    cfg, _, ids0, mask0 = _setup()
    ids = ids0 if ids is None else ids
    mask = mask0 if mask is None else mask
    return np.asarray(_forward(params, ids, mask, adapter_ids, cfg=cfg))


def _peft(model):
    _, _, ids, mask = _setup()
    with torch.no_grad():
        out = model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask))
    return out.logits.numpy()[:, -ids.shape[1] :]


def _rel_err(out, ref):
    valid = _setup()[3].astype(bool)
    return float(np.abs(out - ref)[valid].max() / np.abs(ref[valid]).max())


def _peft_pair(case):
    """A peft model holding adapters "one" and "two" of ``case`` (random, gates open)."""
    cfg, params, _, _ = _setup()
    config_cls, options, _ = CASES[case]
    torch.manual_seed(0)
    make = lambda: config_cls(task_type="CAUSAL_LM", **options, **_tokens(case))
    model = peft.get_peft_model(hf_twin(params, cfg), make(), adapter_name="one")
    model.add_adapter("two", make())
    for name in NAMES:  # peft keeps inactive adaption prompts outside the module tree
        model.set_adapter(name)
        with torch.no_grad():
            for pname, p in model.named_parameters():
                if "adaption_gate" in pname:
                    p.normal_()  # open the gates so the prompts matter
    return model.eval()


def _two_of(method, params, cfg):
    """``params`` holding adapters "one" then "two" of ``method`` (gates opened: 0.7, -0.4)."""
    held = named.add_adapter(jax.random.key(1), params, cfg, method, "one")
    held = named.add_adapter(jax.random.key(2), held, cfg, method, "two")
    entry = held.get("adaption")
    if entry is None:
        return held
    opened = tuple(
        type(ad)(ad.prompt, jnp.full_like(ad.gate, g), ad.layer_mask)
        for ad, g in zip(entry.adapters, (0.7, -0.4), strict=True)
    )
    return {**held, "adaption": named.NamedAdapters(opened, entry.names)}


def _tokens(case):
    return {} if case == "adaption_prompt" else {"num_virtual_tokens": N}


@pytest.mark.parametrize("case", CASES)
def test_peft_named_adapters_load_into_one_tree(case, tmp_path):
    cfg, params, _, _ = _setup()
    model = _peft_pair(case)
    refs = {}
    for name in NAMES:
        model.set_adapter(name)
        refs[name] = _peft(model)
    model.save_pretrained(tmp_path)  # non-default names go to sub-directories
    held = params
    for name in NAMES:
        _, held = named.load_adapter(tmp_path / name, held, cfg, name)
    for name in NAMES:
        err = _rel_err(_ours(named.set_adapter(held, name)), refs[name])
        assert err < 1e-5, (name, err)
    assert not np.allclose(refs["one"], refs["two"])


@pytest.mark.parametrize("case", CASES)
def test_our_named_adapters_load_into_peft(case, tmp_path):
    cfg, params, _, _ = _setup()
    method = CASES[case][2]
    held = _two_of(method, params, cfg)
    for name in NAMES:
        named.save_adapter(tmp_path / name, method, held, cfg, name)
    model = peft.PeftModel.from_pretrained(
        hf_twin(params, cfg), tmp_path / "one", adapter_name="one"
    )
    model.load_adapter(tmp_path / "two", adapter_name="two")
    model.eval()
    outs = {}
    for name in NAMES:
        model.set_adapter(name)
        outs[name] = _ours(named.set_adapter(held, name))
        err = _rel_err(outs[name], _peft(model))
        assert err < 1e-5, (name, err)
    assert not np.allclose(outs["one"], outs["two"])


@pytest.mark.parametrize("case", CASES)
def test_per_row_adapters_equal_separate_runs(case):
    cfg, params, ids, mask = _setup()
    method = CASES[case][2]
    held = _two_of(method, params, cfg)
    rows = ["two", "one", "__base__"] if case == "adaption_prompt" else ["two", "one", "two"]
    ids3, mask3 = np.concatenate([ids, ids[:1]]), np.concatenate([mask, mask[:1]])
    mixed = _ours(held, ids3, mask3, named.adapter_ids(held, rows))
    separate = {n: _ours(named.set_adapter(held, n), ids3, mask3) for n in NAMES}
    separate["__base__"] = _ours(params, ids3, mask3)
    for row, name in enumerate(rows):
        np.testing.assert_allclose(mixed[row], separate[name][row], atol=1e-6, err_msg=name)


def test_only_the_active_adapter_trains():
    cfg, params, _, _ = _setup()
    method = jpeft.PromptTuning(num_virtual_tokens=N)
    held = method.init(jax.random.key(1), params, cfg)  # unnamed: becomes "default"
    held = named.add_adapter(jax.random.key(2), held, cfg, method, "b")
    entry = held["prompt"]
    assert entry.names == ("default", "b") and entry.active_name == "b"
    trainable, frozen = jpeft.split(held)
    assert trainable["prompt"].adapters[0] is None
    assert isinstance(trainable["prompt"].adapters[1], SoftPrompt)
    np.testing.assert_array_equal(
        jpeft.combine(trainable, frozen)["prompt"].adapters[0].embedding,
        entry.adapters[0].embedding,
    )
    switched = named.set_adapter(held, "default").get("prompt")
    assert switched.active_name == "default"
    trainable, _ = jpeft.split({"prompt": switched})
    assert trainable["prompt"].adapters[1] is None


def test_named_adapter_errors(tmp_path):
    cfg, params, ids, mask = _setup()
    method = jpeft.PromptTuning(num_virtual_tokens=N)
    held = named.add_adapter(jax.random.key(1), params, cfg, method, "a")
    with pytest.raises(ValueError, match="already hold an adapter named 'a'"):
        named.add_adapter(jax.random.key(2), held, cfg, method, "a")
    with pytest.raises(ValueError, match="no adapter named 'c'; params hold \\['a'\\]"):
        named.set_adapter(held, "c")
    with pytest.raises(ValueError, match="for LoRA use"):
        named.add_adapter(jax.random.key(2), held, cfg, jpeft.LoRA(r=2), "one")
    with pytest.raises(ValueError, match="reserved or empty"):
        named.add_adapter(jax.random.key(2), params, cfg, method, "__base__")
    longer = named.add_adapter(
        jax.random.key(2), held, cfg, jpeft.PromptTuning(num_virtual_tokens=N + 1), "b"
    )
    with pytest.raises(ValueError, match="outputs of one shape"):
        _ours(longer, ids, mask, jnp.array([0, 1]))
    two = named.add_adapter(jax.random.key(2), held, cfg, method, "b")
    base_row = Context(adapter_ids=jnp.array([0, -1]))
    with pytest.raises(ValueError, match=r"adapter_ids \[-1\] out of range.*every row needs"):
        llama.forward(two, cfg, jnp.asarray(ids), attention_mask=jnp.asarray(mask), ctx=base_row)
    unchecked = _ours(two, ids, mask, jnp.array([0, 2]))  # under jit: the bad row is NaN
    assert np.isfinite(unchecked[0]).all() and np.isnan(unchecked[1]).all()


def test_saving_named_llama_adapters_as_one_adapter_names_the_way(tmp_path):
    cfg, params, _, _ = _setup()
    method = LlamaAdapter(adapter_len=2, adapter_layers=1)
    held = named.add_adapter(jax.random.key(0), params, cfg, method, "one")
    held = named.add_adapter(jax.random.key(1), held, cfg, method, "two")
    with pytest.raises(ValueError, match=r"named adapters \['one', 'two'\].*named.save_adapter"):
        jpeft.save_hf_adapter(tmp_path, method, held, cfg)
