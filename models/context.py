"""Per-call state that a forward pass threads through every layer.

The model itself never knows which PEFT method is active; the few things a
method may need at a projection (compute dtype, a dropout key, which adapter or
task each batch row uses) travel in a :class:`Context`.
"""

from __future__ import annotations

import dataclasses
import zlib

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class Context:
    """What a forward pass knows besides params and activations.

    Attributes:
        dtype: compute dtype of matmuls and activations.
        rng: dropout key, or None when deterministic.
        adapter_ids: int32 ``[B]``: which named adapter each row uses (-1: none).
        task_ids: int32 ``[B]``: which task prompt each row uses.
        disable_adapters: run the base model alone (every adapter ignored), as peft's
            ``with model.disable_adapter():`` (:func:`jpeft.models.selection.for_call`).

    A float16 ``dtype`` on CPU becomes float32 (:func:`runnable_dtype`).

    Example:
        >>> ctx = Context(jnp.float32, rng=jax.random.key(0)).for_layer(3)
        >>> ctx.module_rng("q_proj") is not None
        True
    """

    dtype: jnp.dtype = jnp.float32
    rng: jax.Array | None = None
    adapter_ids: jax.Array | None = None
    task_ids: jax.Array | None = None
    disable_adapters: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "dtype", runnable_dtype(self.dtype))

    @property
    def deterministic(self) -> bool:
        """True when no dropout key was given."""
        return self.rng is None

    def for_layer(self, index: jax.Array | int) -> Context:
        """The context for layer ``index`` (its own dropout stream)."""
        if self.rng is None:
            return self
        return dataclasses.replace(self, rng=jax.random.fold_in(self.rng, index))

    def module_rng(self, name: str) -> jax.Array | None:
        """A dropout key for the module called ``name`` (stable across runs)."""
        if self.rng is None:
            return None
        return jax.random.fold_in(self.rng, zlib.crc32(name.encode()) & 0x7FFFFFFF)


def compute_dtype(dtype: str | jnp.dtype | None = None) -> jnp.dtype:
    """``dtype`` as a ``jnp.dtype``; None or ``"auto"``: the backend's default compute dtype.

    The default is bfloat16 on accelerators (GPU, TPU: their matmul units run 16-bit
    inputs at full rate, and decoding reads half the bytes) and float32 on CPU.

    Example:
        >>> compute_dtype("bfloat16"), compute_dtype() == jnp.dtype(jnp.float32)
        (dtype(bfloat16), True)
    """
    if dtype is None or (isinstance(dtype, str) and dtype == "auto"):
        return jnp.dtype(jnp.float32 if jax.default_backend() == "cpu" else jnp.bfloat16)
    return runnable_dtype(dtype)


def runnable_dtype(dtype: str | jnp.dtype) -> jnp.dtype:
    """``dtype``, except float16 on CPU, which becomes float32.

    XLA's CPU dot has no float16 kernel accumulating in float32 (it fails with "The
    precision 'F16_F16_F32' is not supported by dot_general on CPU"), so float16 params
    compute in float32 there: the answer is the float32 one (transformers computes
    float16 on CPU in float16, which rounds more). bfloat16 runs as it is.

    Example:
        >>> runnable_dtype("float16") == (jnp.float32 if jax.default_backend() == "cpu"
        ...                               else jnp.float16)
        True
    """
    dtype = jnp.dtype(dtype)
    if dtype == jnp.float16 and jax.default_backend() == "cpu":
        return jnp.dtype(jnp.float32)
    return dtype
