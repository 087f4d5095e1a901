"""The key/value cache used by incremental decoding."""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from jpeft.models.config import LlamaConfig


@functools.partial(
    jax.tree_util.register_dataclass,
    data_fields=["k", "v", "mask", "length"],
    meta_fields=["started"],
)
@dataclasses.dataclass(frozen=True)
class KVCache:
    """Rotated keys and values of every layer for ``max_len`` slots.

    Attributes:
        k, v: ``[layers, B, max_len, kv_heads, head_dim]``.
        mask: int32 ``[B, max_len]``, 1 where a slot holds a real (or virtual) token.
        length: int32 scalar, slots filled so far (the next write position).
        started: static; False until the first (prefill) call wrote into it. Soft
            prompts are prepended only by the prefill call.

    Example:
        >>> cfg = LlamaConfig(vocab_size=8, hidden_size=16, intermediate_size=8,
        ...                   num_hidden_layers=2, num_attention_heads=2)
        >>> KVCache.create(cfg, batch_size=3, max_len=10).k.shape
        (2, 3, 10, 2, 8)
    """

    k: jax.Array
    v: jax.Array
    mask: jax.Array
    length: jax.Array
    started: bool = False

    @classmethod
    def create(
        cls, cfg: LlamaConfig, batch_size: int, max_len: int, dtype: jnp.dtype = jnp.float32
    ) -> KVCache:
        """An empty cache."""
        shape = (cfg.num_hidden_layers, batch_size, max_len, cfg.num_key_value_heads, cfg.head_dim)
        return cls(
            k=jnp.zeros(shape, dtype),
            v=jnp.zeros(shape, dtype),
            mask=jnp.zeros((batch_size, max_len), jnp.int32),
            length=jnp.zeros((), jnp.int32),
        )

    @property
    def max_len(self) -> int:
        return self.k.shape[2]
