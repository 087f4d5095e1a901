"""MultitaskPromptTuning's source-task inits against peft 0.21's ``MultitaskPromptEmbedding``.

A source multitask adapter is trained (here: drawn) and saved by peft; a new adapter
starts from it with AVERAGE_SOURCE_TASKS, EXACT_SOURCE_TASK or ONLY_SOURCE_SHARED.
peft's initialized prompt parameters are the oracle, and the logits of the start.
"""

import jax
import jax.numpy as jnp
import numpy as np
import peft
import pytest
import torch
from conftest import hf_twin

import jpeft
from jpeft.models import llama
from jpeft.models.context import Context

N, TASKS, RANKS = 3, 3, 2


@pytest.fixture
def source(params, cfg, tmp_path):
    """A peft multitask adapter with 3 distinct tasks, saved; its weights file."""
    torch.manual_seed(0)
    config = peft.MultitaskPromptTuningConfig(
        task_type="CAUSAL_LM", num_virtual_tokens=N, num_tasks=TASKS, num_ranks=RANKS
    )
    model = peft.get_peft_model(hf_twin(params, cfg), config)
    with torch.no_grad():
        model.prompt_encoder.default.prefix_task_cols.normal_()
        model.prompt_encoder.default.prefix_task_rows.normal_()
    model.save_pretrained(tmp_path / "source")
    return tmp_path / "source" / "adapter_model.safetensors"


def _peft_start(params, cfg, init, path, num_tasks, task=0):
    config = peft.MultitaskPromptTuningConfig(
        task_type="CAUSAL_LM",
        num_virtual_tokens=N,
        num_tasks=num_tasks,
        num_ranks=RANKS,
        prompt_tuning_init=init,
        prompt_tuning_init_state_dict_path=str(path),
        prompt_tuning_init_task=task,
    )
    return peft.get_peft_model(hf_twin(params, cfg), config).eval()


CASES = [("AVERAGE_SOURCE_TASKS", 1, 0), ("EXACT_SOURCE_TASK", 1, 2), ("ONLY_SOURCE_SHARED", 3, 0)]


@pytest.mark.parametrize("init, num_tasks, task", CASES)
def test_source_inits_match_peft(init, num_tasks, task, source, params, cfg, batch):
    model = _peft_start(params, cfg, init, source, num_tasks, task)
    theirs = model.prompt_encoder.default
    method = jpeft.MultitaskPromptTuning(
        num_virtual_tokens=N,
        num_tasks=num_tasks,
        num_ranks=RANKS,
        prompt_init=init,
        init_state_dict_path=str(source.parent),  # the directory works too
        init_task=task,
    )
    ours = method.init(jax.random.key(0), params, cfg)["prompt"]
    np.testing.assert_array_equal(ours.embedding, theirs.embedding.weight.detach().numpy())
    assert ours.task_cols.shape == (num_tasks, N, RANKS)
    if init == "ONLY_SOURCE_SHARED":  # task factors start random, N(0, 0.02) in both
        assert float(jnp.std(ours.task_cols)) < 0.1
        return
    for field, name in (("task_cols", "prefix_task_cols"), ("task_rows", "prefix_task_rows")):
        ref = getattr(theirs, name).detach().numpy()
        np.testing.assert_allclose(getattr(ours, field), ref, rtol=1e-6, atol=1e-7)
    ids, mask = batch
    tasks = np.zeros(len(ids), np.int64)
    with torch.no_grad():
        ref = model(
            input_ids=torch.tensor(ids),
            attention_mask=torch.tensor(mask),
            task_ids=torch.tensor(tasks),
        ).logits.numpy()[:, -ids.shape[1] :]
    adapted = {**params, "prompt": ours}
    out = llama.forward(
        adapted,
        cfg,
        jnp.asarray(ids),
        attention_mask=mask,
        ctx=Context(task_ids=jnp.asarray(tasks)),
    )
    valid = mask.astype(bool)
    err = float(np.abs(np.asarray(out) - ref)[valid].max() / np.abs(ref[valid]).max())
    assert err < 1e-5, err


def test_source_init_adapter_round_trips_with_peft(source, params, cfg, tmp_path):
    method = jpeft.MultitaskPromptTuning(
        num_virtual_tokens=N,
        num_ranks=RANKS,
        prompt_init="EXACT_SOURCE_TASK",
        init_state_dict_path=str(source),
        init_task=1,
    )
    adapted = method.init(jax.random.key(0), params, cfg)
    jpeft.save_hf_adapter(tmp_path / "ours", method, adapted, cfg)
    loaded = peft.PeftModel.from_pretrained(hf_twin(params, cfg), tmp_path / "ours")
    assert loaded.peft_config["default"].prompt_tuning_init == "EXACT_SOURCE_TASK"
    cols = loaded.prompt_encoder.default.prefix_task_cols.detach().numpy()
    np.testing.assert_array_equal(cols, adapted["prompt"].task_cols)
    again, _ = jpeft.load_hf_adapter(tmp_path / "ours", params, cfg)
    assert again == method


def test_source_init_errors(source, params, cfg, tmp_path):
    def make(n=N, **kw):
        return jpeft.MultitaskPromptTuning(num_virtual_tokens=n, num_ranks=RANKS, **kw)

    with pytest.raises(ValueError, match="needs init_state_dict_path"):
        make(prompt_init="ONLY_SOURCE_SHARED")
    with pytest.raises(ValueError, match="num_tasks=3, expected 1"):
        make(prompt_init="AVERAGE_SOURCE_TASKS", init_state_dict_path=str(source), num_tasks=3)
    cases = [
        (
            make(prompt_init="EXACT_SOURCE_TASK", init_state_dict_path=str(source), init_task=3),
            "init_task=3, the source has 3 tasks",
        ),
        (
            make(N + 1, prompt_init="ONLY_SOURCE_SHARED", init_state_dict_path=str(source)),
            r"'prompt_embeddings' has shape \[3, 32\], expected \[4, 32\]",
        ),
        (
            make(prompt_init="ONLY_SOURCE_SHARED", init_state_dict_path=str(tmp_path / "x.bin")),
            "expected a .safetensors file",
        ),
    ]
    for method, match in cases:
        with pytest.raises(ValueError, match=match):
            method.init(jax.random.key(0), params, cfg)
