"""The key/value cache used by incremental decoding, and its in-place layer write.

The cache holds every layer's keys and values in one stacked array each. The layer
loop of :func:`jpeft.models.llama.forward` carries those stacked arrays and each layer
writes its new keys/values into them with a dynamic update (:func:`write_layer`), so
under ``jit`` with the cache donated (or as a ``while_loop`` carry) XLA updates the
cache buffer in place: a decode step reads each layer's keys/values once and writes
only the new token's slots, instead of restacking per-layer copies.

The cache is stored heads-major, ``[layers, B, kv_heads, slots, head_dim]`` (the layout
of transformers' ``DynamicCache``, ``[B, heads, S, D]`` per layer): the batch and
key/value-head axes lead, so both dots of grouped-query attention
(:func:`jpeft.models.attention.cached_attention`) read a layer's keys and values as
stored. In the token-major layout ``[layers, B, slots, kv_heads, head_dim]`` the head
axis, a batch axis of those dots, sits between the slots and the features, and XLA's
GPU compiler transposed the whole cache into the dots' layout every decode step.
"""

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
        k, v: ``[layers, B, kv_heads, max_len, head_dim]`` (heads-major, see above).
        mask: int32 ``[B, max_len]``, 1 where a slot holds a real (or virtual) token.
        length: int32 scalar, slots filled so far (the next write position).
        started: static; False until the first (prefill) call wrote into it. Soft
            prompts are prepended only by the prefill call.

    Example:
        >>> cfg = LlamaConfig(vocab_size=8, hidden_size=16, intermediate_size=8,
        ...                   num_hidden_layers=2, num_attention_heads=2)
        >>> KVCache.create(cfg, batch_size=3, max_len=10).k.shape
        (2, 3, 2, 10, 8)
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
        shape = (cfg.num_hidden_layers, batch_size, cfg.num_key_value_heads, max_len, cfg.head_dim)
        return cls(
            k=jnp.zeros(shape, dtype),
            v=jnp.zeros(shape, dtype),
            mask=jnp.zeros((batch_size, max_len), jnp.int32),
            length=jnp.zeros((), jnp.int32),
        )

    @property
    def max_len(self) -> int:
        return self.k.shape[3]


def write_layer(
    stack: jax.Array, layer: jax.Array, position: jax.Array, new: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """Write ``new [B, T, K, D]`` into ``stack [L, B, K, S, D]`` at ``[layer, :, :, position]``.

    Returns the updated stack and its layer ``layer`` (``[B, K, S, D]``, the keys or
    values attention reads). ``new`` is cast to the stack's dtype and moved heads-major
    (a transpose of the ``T`` new tokens only). One dynamic update of the whole stack,
    which XLA performs in place when the stack is a donated argument or a loop carry.

    Example:
        >>> stack = jnp.zeros((2, 1, 1, 4, 1))
        >>> stack, view = write_layer(stack, jnp.int32(1), jnp.int32(2), jnp.ones((1, 1, 1, 1)))
        >>> stack[:, 0, 0, :, 0].tolist(), view.shape
        ([[0.0, 0.0, 0.0, 0.0], [0.0, 0.0, 1.0, 0.0]], (1, 1, 4, 1))
    """
    zero = jnp.zeros((), jnp.int32)
    start = (layer, zero, zero, position, zero)
    update = new.astype(stack.dtype).transpose(0, 2, 1, 3)[None]
    stack = jax.lax.dynamic_update_slice(stack, update, start)
    return stack, jax.lax.dynamic_index_in_dim(stack, layer, axis=0, keepdims=False)
