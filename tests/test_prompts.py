"""Prompt-learning methods: initialization, bad input, multitask batches, padding, training.

The model, batch and jitted forward come from tests/test_prompts_peft.py, so compiled
forwards are shared between the two files.
"""

import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import peft
import pytest
import tokenizers
from conftest import tiny_config
from test_prompts_peft import N, _forward, _setup, _twin
from tokenizers import models as tok_models
from tokenizers import pre_tokenizers, processors

import jpeft
from jpeft.models import hooks, llama
from jpeft.models.context import Context
from jpeft.models.generate import generate
from jpeft.models.tokenizer import Tokenizer
from jpeft.prompts import MultitaskPrompt, Prefix, SoftPrompt, encoders
from jpeft.sharding import logical_axes
from jpeft.train.checkpoint import Checkpointer
from jpeft.train.state import TrainState

WORDS = "classify the review as good or bad"


def _tokenizer_dir(tmp_path):
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{w: i + 3 for i, w in enumerate(WORDS.split())}}
    tok = tokenizers.Tokenizer(tok_models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tok.save(str(tmp_path / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<s>",
        "unk_token": "<unk>",
    }
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    return tmp_path


@pytest.mark.parametrize("n", [3, 11])  # fewer / more virtual tokens than the text has
def test_text_init_matches_peft(n, tmp_path):
    cfg, params, _, _ = _setup("gqa")
    path = _tokenizer_dir(tmp_path)
    config = peft.PromptTuningConfig(
        task_type="CAUSAL_LM",
        num_virtual_tokens=n,
        prompt_tuning_init="TEXT",
        prompt_tuning_init_text=WORDS,
        tokenizer_name_or_path=str(path),
    )
    theirs = peft.get_peft_model(_twin("gqa"), config).prompt_encoder.default
    method = jpeft.PromptTuning(
        num_virtual_tokens=n,
        prompt_init="TEXT",
        init_text=WORDS,
        tokenizer=Tokenizer.from_dir(path),
    )
    ours = method.init(jax.random.key(0), params, cfg)["prompt"].embedding
    np.testing.assert_array_equal(np.asarray(ours), theirs.embedding.weight.detach().numpy())


def test_sample_vocab_and_random_init():
    cfg, params, _, _ = _setup("gqa")
    method = jpeft.PromptTuning(num_virtual_tokens=16, prompt_init="SAMPLE_VOCAB")
    prompt = np.asarray(method.init(jax.random.key(0), params, cfg)["prompt"].embedding)
    vocab = np.asarray(params["embed_tokens"]["embedding"])
    assert all((vocab == row).all(axis=1).any() for row in prompt)
    method = jpeft.PromptTuning(num_virtual_tokens=64)
    prompt = np.asarray(method.init(jax.random.key(0), params, cfg)["prompt"].embedding)
    assert 0.9 < prompt.std() < 1.1  # nn.Embedding's N(0, 1), as peft


@pytest.mark.parametrize(
    "make",
    [
        lambda: jpeft.PromptTuning(num_virtual_tokens=0),
        lambda: jpeft.PTuning(num_virtual_tokens=-1),
        lambda: jpeft.PrefixTuning(num_virtual_tokens=0),
        lambda: jpeft.PTuningV2(num_virtual_tokens=0),
        lambda: jpeft.MultitaskPromptTuning(num_virtual_tokens=0),
        lambda: jpeft.PromptTuning(prompt_init="TEXT"),
        lambda: jpeft.PromptTuning(prompt_init="ZEROS"),
        lambda: jpeft.PTuning(encoder_type="GRU"),
        lambda: jpeft.PrefixTuning(init_weights="ones"),
        lambda: jpeft.MultitaskPromptTuning(num_tasks=0),
    ],
)
def test_bad_config_raises(make):
    with pytest.raises(
        ValueError, match=r"num_virtual_tokens|prompt_init|encoder_type|init_w|num_t"
    ):
        make()


def test_bad_use_raises():
    cfg, params, _, _ = _setup("gqa")
    method = jpeft.PromptTuning(num_virtual_tokens=N, prompt_init="TEXT", init_text=WORDS)
    with pytest.raises(ValueError, match="tokenizer"):
        method.init(jax.random.key(0), params, cfg)
    adapted = jpeft.PromptTuning(num_virtual_tokens=N).init(jax.random.key(0), params, cfg)
    with pytest.raises(ValueError, match="already hold a 'prompt'"):
        jpeft.PTuning(num_virtual_tokens=N).init(jax.random.key(0), adapted, cfg)
    config = jpeft.PromptTuning(num_virtual_tokens=N).adapter_config(tiny_config(hidden_size=48))
    with pytest.raises(ValueError, match="token_dim=48, the model has 32"):
        jpeft.PromptTuning.from_adapter(config, {}, params, cfg)


def test_task_ids_are_checked():
    node = jpeft.MultitaskPromptTuning(num_virtual_tokens=N, num_tasks=3).init(
        jax.random.key(0), _setup("gqa")[1], _setup("gqa")[0]
    )["prompt"]
    for bad in ([0, 3], [-1, 0]):
        with pytest.raises(ValueError, match=r"task_ids \[-?\d\] out of range: .* 3 tasks"):
            hooks.prompt_embeddings(node, 2, Context(task_ids=jnp.array(bad)))
    with pytest.raises(ValueError, match="needs task_ids"):
        hooks.prompt_embeddings(node, 2, Context())
    with pytest.raises(ValueError, match=r"expected shape \(2,\)"):
        hooks.prompt_embeddings(node, 2, Context(task_ids=jnp.array([0, 1, 2])))
    # under jit the ids cannot be checked: a row with a bad id gets a NaN prompt
    jitted = jax.jit(lambda ids: hooks.prompt_embeddings(node, 3, Context(task_ids=ids)))
    out = np.asarray(jitted(jnp.array([1, 3, -1])))
    assert np.isfinite(out[0]).all() and np.isnan(out[1:]).all()


def test_mixed_task_batch_equals_per_task_runs():
    cfg, params, ids, mask = _setup("gqa")
    method = jpeft.MultitaskPromptTuning(num_virtual_tokens=N, num_tasks=3, num_ranks=2)
    adapted = method.init(jax.random.key(1), params, cfg)
    node = adapted["prompt"]  # make the tasks clearly different
    adapted["prompt"] = MultitaskPrompt(node.embedding, 50 * node.task_cols, node.task_rows)
    ids, mask, mixed = jnp.asarray(ids), jnp.asarray(mask), jnp.array([2, 0])
    out = _forward(adapted, ids, mask, None, mixed, cfg=cfg)
    for row, task in enumerate(mixed.tolist()):
        alone = _forward(adapted, ids, mask, None, jnp.full((2,), task, jnp.int32), cfg=cfg)
        np.testing.assert_array_equal(np.asarray(out[row]), np.asarray(alone[row]))
    assert not np.allclose(out[0], _forward(adapted, ids, mask, None, mixed[::-1], cfg=cfg)[0])
    gen_ids, gen_mask = ids[:, :7], jnp.ones((2, 7), jnp.int32)
    tokens = generate(
        adapted, cfg, gen_ids, gen_mask, max_new_tokens=5, stop_tokens=(), task_ids=mixed
    )
    for row, task in enumerate(mixed.tolist()):
        alone = generate(
            adapted,
            cfg,
            gen_ids,
            gen_mask,
            max_new_tokens=5,
            stop_tokens=(),
            task_ids=jnp.full((2,), task, jnp.int32),
        )
        np.testing.assert_array_equal(np.asarray(tokens.tokens[row]), np.asarray(alone.tokens[row]))


@pytest.mark.parametrize(
    "method",
    [jpeft.PromptTuning(num_virtual_tokens=N), jpeft.PTuningV2(num_virtual_tokens=N)],
    ids=["prompt", "prefix"],
)
def test_left_padded_row_equals_right_padded_row(method):
    """The same tokens give the same logits wherever the padding sits."""
    cfg, params, ids, mask = _setup("gqa")
    adapted = method.init(jax.random.key(1), params, cfg)
    right = np.asarray(_forward(adapted, jnp.asarray(ids), jnp.asarray(mask), None, None, cfg=cfg))
    left_ids, left_mask = np.roll(ids, 3, axis=1), np.roll(mask, 3, axis=1)
    left = _forward(adapted, jnp.asarray(left_ids), jnp.asarray(left_mask), None, None, cfg=cfg)
    np.testing.assert_allclose(np.asarray(left)[1, 3:], right[1, :6], rtol=1e-5, atol=1e-5)


def _loss(trainable, frozen, cfg, ids):
    params = jpeft.combine(trainable, frozen)
    logits = llama.forward(params, cfg, ids)[:, :-1]
    logp = jax.nn.log_softmax(logits)
    return -jnp.mean(jnp.take_along_axis(logp, ids[:, 1:, None], axis=-1))


ALL = [
    jpeft.PromptTuning(num_virtual_tokens=N),
    jpeft.PTuning(num_virtual_tokens=N, encoder_type="LSTM", encoder_hidden_size=8),
    jpeft.PrefixTuning(num_virtual_tokens=N, encoder_hidden_size=8),
    jpeft.PTuningV2(num_virtual_tokens=N),
    jpeft.MultitaskPromptTuning(num_virtual_tokens=N, num_tasks=3, num_ranks=2),
]


def test_only_prompt_params_are_trainable_and_nothing_merges():
    cfg, params, _, _ = _setup("gqa")
    for method in ALL:
        adapted = method.init(jax.random.key(1), params, cfg)
        entry = "prefix" if "prefix" in adapted else "prompt"
        trainable, frozen = jpeft.split(adapted)
        assert set(trainable) == {entry}
        assert jax.tree.leaves(frozen[entry]) == []  # every array of the node is trainable
        assert jpeft.merge(adapted)[entry] is adapted[entry]
        axes = logical_axes(adapted)[entry]  # small tensors: replicated
        assert all(all(a is None for a in t) for t in jax.tree.leaves(axes, is_leaf=_is_tuple))


@pytest.mark.parametrize(
    "method",
    [
        jpeft.PTuning(num_virtual_tokens=N, encoder_hidden_size=8),
        jpeft.PTuningV2(num_virtual_tokens=N),
    ],
    ids=lambda m: type(m).__name__,
)
def test_training_changes_only_the_prompt_and_reduces_loss(method):
    cfg, params, ids, _ = _setup("gqa")
    trainable, frozen = jpeft.split(method.init(jax.random.key(1), params, cfg))
    grad = jax.jit(jax.value_and_grad(_loss), static_argnums=2)
    tx = optax.adam(0.05)
    ids, opt_state = jnp.asarray(ids), tx.init(trainable)
    losses, start = [], trainable
    for _ in range(6):
        loss, g = grad(trainable, frozen, cfg, ids)
        losses.append(float(loss))
        updates, opt_state = tx.update(g, opt_state)
        trainable = optax.apply_updates(trainable, updates)
    assert losses[-1] < losses[0] - 0.05, losses
    moved = jax.tree.map(lambda a, b: bool(jnp.any(a != b)), trainable, start)
    assert all(jax.tree.leaves(moved))
    _, frozen_after = jpeft.split(jpeft.combine(trainable, frozen))
    jax.tree.map(np.testing.assert_array_equal, frozen_after, frozen)


def _is_tuple(x):
    return isinstance(x, tuple)


def test_peft_config_keys_for_gqa_prefix():
    cfg, params, _, _ = _setup("gqa")
    method = jpeft.PrefixTuning(num_virtual_tokens=N)
    config = method.adapter_config(cfg)
    kv_dim = cfg.num_key_value_heads * cfg.head_dim
    assert config["token_dim"] == kv_dim == config["encoder_hidden_size"]
    assert config["num_attention_heads"] == cfg.num_key_value_heads
    assert config["num_transformer_submodules"] == 1 and config["prefix_projection"] is True
    table = method.adapter_tensors(method.init(jax.random.key(0), params, cfg), cfg)
    assert table["prompt_embeddings"].shape == (N, cfg.num_hidden_layers * 2 * kv_dim)
    # PTuningV2 is prefix tuning without reparameterization, exported as PREFIX_TUNING
    v2 = jpeft.PTuningV2(num_virtual_tokens=N).adapter_config(cfg)
    assert v2["peft_type"] == "PREFIX_TUNING" and v2["prefix_projection"] is False


def test_prefix_layout_is_per_layer_key_then_value():
    table = jnp.arange(2 * 3 * 2 * 2 * 4, dtype=jnp.float32).reshape(2, -1)  # n=2, L=3
    k, v = hooks.prefix_key_values(Prefix(table, 2, 4), 1, Context())
    view = np.asarray(table).reshape(2, 3 * 2, 2, 4)  # peft: [n, L*2, kv_heads, head_dim]
    for layer in range(3):
        np.testing.assert_array_equal(np.asarray(k[layer, 0]), view[:, 2 * layer])
        np.testing.assert_array_equal(np.asarray(v[layer, 0]), view[:, 2 * layer + 1])


def test_lstm_dropout_only_with_a_key():
    p = encoders.init_lstm(jax.random.key(0), 8, 4, num_layers=2)
    x = jax.random.normal(jax.random.key(1), (3, 8))
    run = jax.jit(lambda key: (encoders.lstm(p, x, 0.5), encoders.lstm(p, x, 0.5, key)))
    plain, dropped = run(jax.random.key(2))
    assert not np.allclose(plain, dropped)


def test_soft_prompt_broadcasts_over_the_batch():
    node = SoftPrompt(jnp.arange(6.0).reshape(3, 2))
    out = hooks.prompt_embeddings(node, 4, Context())
    assert out.shape == (4, 3, 2) and (np.asarray(out) == np.asarray(node.embedding)).all()


def test_adapter_only_checkpoint_round_trip(tmp_path):
    """The trainable partition (LSTM encoder lists and dicts included) saves and restores."""
    cfg, params, _, _ = _setup("gqa")
    method = jpeft.PTuning(num_virtual_tokens=N, encoder_type="LSTM", encoder_hidden_size=8)
    trainable, _ = jpeft.split(method.init(jax.random.key(1), params, cfg))
    state = TrainState.create(apply_fn=None, trainable=trainable, tx=optax.sgd(0.1))
    Checkpointer(tmp_path).save(state)
    fresh = TrainState.create(
        apply_fn=None,
        trainable=jax.tree.map(jnp.zeros_like, trainable),
        tx=optax.sgd(0.1),
    )
    restored, _ = Checkpointer(tmp_path).restore(fresh)
    jax.tree.map(np.testing.assert_array_equal, restored.trainable, trainable)
