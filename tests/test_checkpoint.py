"""Adapter-only checkpoints: exact resume, size, atomicity, retention and clear errors."""

from __future__ import annotations

import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import tiny_config

import jpeft
from jpeft.models import llama
from jpeft.optim.groups import adamw
from jpeft.train import TrainState, train_step
from jpeft.train.checkpoint import Checkpointer

CFG = tiny_config()
MODEL = llama.Llama(CFG)
TX = adamw(1e-2, weight_decay=0.01, max_grad_norm=1.0, lora_plus_ratio=4.0)
STEP = jax.jit(train_step, donate_argnums=0)


def lora_params(r: int = 4, targets=("q_proj", "v_proj"), cfg=CFG):
    params = llama.init_params(jax.random.key(0), cfg)
    params = jpeft.LoRA(r=r, alpha=8, dropout=0.1, targets=targets).init(
        jax.random.key(1), params, cfg
    )
    params["norm"]["scale"] = jpeft.Trained(params["norm"]["scale"])
    return params


def new_state(trainable) -> TrainState:
    return TrainState.create(apply_fn=MODEL.apply, trainable=trainable, tx=TX, rng=5)


def batches(n: int) -> list[dict[str, np.ndarray]]:
    rs = np.random.RandomState(0)
    out = []
    for _ in range(n):
        ids = rs.randint(0, CFG.vocab_size, (2, 10)).astype(np.int32)
        mask = np.ones_like(ids)
        out.append({"input_ids": ids, "attention_mask": mask, "loss_mask": mask})
    return out


def dir_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(path) for f in fs)


def test_resume_continues_the_same_trajectory_bit_for_bit(tmp_path):
    trainable, frozen = jpeft.split(lora_params())
    data = batches(6)
    straight = new_state(jax.tree.map(jnp.array, trainable))
    for batch in data:
        straight, _ = STEP(straight, frozen, batch)

    state = new_state(jax.tree.map(jnp.array, trainable))
    for batch in data[:3]:
        state, _ = STEP(state, frozen, batch)
    with Checkpointer(tmp_path / "ckpt") as ckpt:
        assert ckpt.save(state, data={"next_batch": 3})
    del state
    template = jax.eval_shape(lambda: new_state(trainable))
    with Checkpointer(tmp_path / "ckpt") as ckpt:
        resumed, position = ckpt.restore(template)
    assert position == {"next_batch": 3} and int(resumed.step) == 3
    for batch in data[position["next_batch"] :]:
        resumed, _ = STEP(resumed, frozen, batch)

    assert int(resumed.step) == int(straight.step) == 6
    assert jax.random.key_data(resumed.rng).tolist() == jax.random.key_data(straight.rng).tolist()
    leaves = jax.tree.leaves((resumed.trainable, resumed.opt_state))
    expected = jax.tree.leaves((straight.trainable, straight.opt_state))
    assert len(leaves) == len(expected)
    for x, y in zip(leaves, expected, strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_checkpoint_holds_the_trainable_part_only(tmp_path):
    cfg = tiny_config(vocab_size=4096, hidden_size=64, intermediate_size=128)
    params = lora_params(cfg=cfg)
    trainable, frozen = jpeft.split(params)
    state = new_state(trainable)
    with Checkpointer(tmp_path) as ckpt:
        ckpt.save(state)
    saved = jpeft.nbytes((state.trainable, state.opt_state))
    size = dir_bytes(tmp_path)
    assert saved <= size <= saved + 128 * 1024  # arrays plus orbax's small metadata files
    assert size < jpeft.nbytes(frozen) / 10


def test_keeps_the_newest_checkpoints(tmp_path):
    state = new_state(jpeft.split(lora_params())[0])
    with Checkpointer(tmp_path, max_to_keep=2) as ckpt:
        for step in (1, 2, 3):
            assert ckpt.save(state.replace(step=jnp.int32(step)))
        assert not ckpt.save(state.replace(step=jnp.int32(3)))  # already saved
        assert ckpt.all_steps() == [2, 3]


def test_an_interrupted_save_is_ignored(tmp_path):
    state = new_state(jpeft.split(lora_params())[0])
    with Checkpointer(tmp_path) as ckpt:
        ckpt.save(state.replace(step=jnp.int32(3)), data={"at": 3})
    # What an interrupted save leaves behind: orbax's temporary directory, half written.
    partial = tmp_path / "6.orbax-checkpoint-tmp"
    shutil.copytree(tmp_path / "3", partial)
    shutil.rmtree(partial / "meta")
    os.remove(partial / "commit_success.txt")
    with Checkpointer(tmp_path) as ckpt:
        assert ckpt.latest_step() == 3
        restored, data = ckpt.restore(state)
    assert int(restored.step) == 3 and data == {"at": 3}


def test_mismatched_checkpoints_name_what_differs(tmp_path):
    state = new_state(jpeft.split(lora_params(r=4))[0])
    with Checkpointer(tmp_path) as ckpt:
        ckpt.save(state)
        other_rank = new_state(jpeft.split(lora_params(r=8))[0])
        with pytest.raises(
            ValueError, match=r"q_proj/kernel/adapters/0/a: checkpoint \[2, 32, 4\]"
        ):
            ckpt.restore(other_rank)
        other_targets = new_state(jpeft.split(lora_params(targets=("k_proj", "v_proj")))[0])
        with pytest.raises(ValueError, match=r"missing from the checkpoint: .*k_proj"):
            ckpt.restore(other_targets)


def test_missing_or_corrupt_checkpoints_and_bad_data(tmp_path):
    state = new_state(jpeft.split(lora_params())[0])
    with Checkpointer(tmp_path) as ckpt:
        with pytest.raises(FileNotFoundError, match="no checkpoint"):
            ckpt.restore(state)
        with pytest.raises(ValueError, match="JSON"):
            ckpt.save(state, data={"bad": {1, 2}})
        ckpt.save(state)
    (tmp_path / "0" / "meta" / "metadata").write_text("{not json")
    with Checkpointer(tmp_path) as ckpt, pytest.raises(ValueError, match="could not be read"):
        ckpt.restore(state)
