"""The 1.1B LoRA training step as an abstract program, for the deviceless benchmarks.

TinyLlama-1.1B's shape (hidden 2048, 22 layers, 32/4 heads, intermediate 5632, vocab
32,000 unless told), bf16 base and compute, LoRA r=16 on every linear layer, AdamW, a
batch of 4 x 2048 tokens: :func:`lora_step` returns ``train_step`` and its abstract
arguments placed on a mesh; nothing is allocated.

Example:
    >>> from deviceless import target_mesh
    >>> step, args = lora_step(target_mesh(prefer_gpu=False), layers=1, hidden=64,
    ...                        intermediate=128, heads=4, kv_heads=2, vocab=100, seq=16)
    >>> args[2]["input_ids"].shape
    (4, 16)
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax
from deviceless import abstract
from jax.sharding import Mesh

import jpeft
from jpeft.models import llama
from jpeft.models.config import LlamaConfig
from jpeft.train import TrainState, train_step


def lora_step(
    mesh: Mesh,
    *,
    remat: str = "full",
    attention_impl: str = "auto",
    layers: int = 22,
    hidden: int = 2048,
    intermediate: int = 5632,
    heads: int = 32,
    kv_heads: int = 4,
    vocab: int = 32000,
    batch: int = 4,
    seq: int = 2048,
) -> tuple[Callable[..., Any], tuple[Any, Any, Any]]:
    """``(train_step, (state, frozen, batch))`` with abstract arguments on ``mesh``."""
    cfg = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=max(2048, seq),
    )
    model = llama.Llama(cfg, dtype=jnp.bfloat16, remat=remat, attention_impl=attention_impl)
    method = jpeft.LoRA(r=16, alpha=32, targets="all-linear")

    def init() -> tuple[TrainState, Any]:
        base = llama.init_params(jax.random.key(0), cfg, jnp.bfloat16)
        trainable, frozen = jpeft.split(method.init(jax.random.key(1), base, cfg))
        state = TrainState.create(apply_fn=model.apply, trainable=trainable, tx=optax.adamw(2e-4))
        return state, frozen

    state, frozen = jax.eval_shape(init)
    tokens = jax.ShapeDtypeStruct((batch, seq), jnp.int32)
    data = {"input_ids": tokens, "attention_mask": tokens, "loss_mask": tokens}
    return train_step, abstract((state, frozen, data), mesh)
