"""Prompt-learning nodes and the forward hooks they answer.

``params["prompt"]`` holds a soft prompt prepended to the input embeddings
(its ``prompt_embeddings`` hook); ``params["prefix"]`` holds per-layer key/value
prefixes (its ``prefix_key_values`` hook). Each node's ``table()`` is the tensor peft
saves as ``prompt_embeddings`` (the encoder output, never the encoder). None of them
can fold into the base weights: ``merged()`` returns the node itself. Their arrays are
small and replicated (the default :meth:`jpeft.nodes.Node.logical_axes`); embeddings
and prefixes take no weight decay, the matrices of an encoder do.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jpeft.models.context import Context
from jpeft.models.pytree import Params
from jpeft.nodes import Node, node
from jpeft.prompts import encoders
from jpeft.prompts.named import NamedAdapters
from jpeft.prompts.peft_io import TABLE


class _BroadcastPrompt:
    """The ``prompt_embeddings`` hook of nodes whose one ``table()`` serves every row."""

    def prompt_embeddings(self, batch_size: int, ctx: Context) -> jax.Array:
        table = self.table(ctx.module_rng("prompt_encoder"))
        return jnp.broadcast_to(table[None], (batch_size, *table.shape))


class _FlatPrefix:
    """The ``prefix_key_values`` hook of nodes whose ``table()`` is peft's flat prefix."""

    def prefix_key_values(self, batch_size: int, ctx: Context) -> tuple[jax.Array, jax.Array]:
        table = self.table()
        n, width = table.shape
        per_layer = 2 * self.kv_heads * self.head_dim
        if width % per_layer:
            raise ValueError(f"prefix width {width} is not a multiple of 2 * kv_heads * head_dim")
        kv = table.reshape(n, width // per_layer, 2, self.kv_heads, self.head_dim)
        kv = jnp.moveaxis(kv, 0, 2)  # [layers, 2, n, kv_heads, head_dim]
        shape = (kv.shape[0], batch_size, *kv.shape[2:])
        return jnp.broadcast_to(kv[:, 0][:, None], shape), jnp.broadcast_to(
            kv[:, 1][:, None], shape
        )


@node(trainable=("embedding",), decay=())
class SoftPrompt(_BroadcastPrompt, Node):
    """A plain soft prompt ``embedding [n_virtual, hidden]`` (prompt tuning).

    Example:
        >>> p = SoftPrompt(jnp.zeros((4, 8)))
        >>> p.prompt_embeddings(2, Context()).shape
        (2, 4, 8)
    """

    embedding: jax.Array

    def table(self, rng: jax.Array | None = None) -> jax.Array:
        """The ``[n_virtual, hidden]`` prompt."""
        return self.embedding


@node(trainable=("embedding", "encoder"), static=("kind", "dropout"), decay=("encoder",))
class PromptEncoder(_BroadcastPrompt, Node):
    """P-tuning: virtual-token ``embedding [n, hidden]`` through an MLP or LSTM ``encoder``.

    Example:
        >>> enc = encoders.init_mlp(jax.random.key(0), 8, 4)
        >>> PromptEncoder(jnp.zeros((3, 8)), enc, "MLP", 0.0).table().shape
        (3, 8)
    """

    embedding: jax.Array
    encoder: dict[str, Any]
    kind: str
    dropout: float

    def table(self, rng: jax.Array | None = None) -> jax.Array:
        """The encoder output ``[n_virtual, hidden]`` (dropout only when ``rng`` is given)."""
        if self.kind == "LSTM":
            return encoders.lstm(self.encoder, self.embedding, self.dropout, rng)
        return encoders.mlp(self.encoder, self.embedding)


@node(trainable=("embedding", "task_cols", "task_rows"), decay=())
class MultitaskPrompt(Node):
    """peft's multitask prompt: row ``b`` gets ``embedding * (cols[t] @ rows[t])``, ``t = ids[b]``.

    ``embedding [n, hidden]`` is shared, ``task_cols [tasks, n, rank]`` and
    ``task_rows [tasks, rank, hidden]`` are per task. The forward reads the task of
    each row from ``ctx.task_ids [B]`` (``Llama(...)(ids, task_ids=...)``). An id
    outside ``[0, tasks)`` raises ``ValueError`` when the ids are concrete; under
    ``jit`` they cannot be checked and the row's prompt (so its logits) is NaN.

    Example:
        >>> p = MultitaskPrompt(jnp.ones((3, 8)), jnp.ones((2, 3, 1)), jnp.ones((2, 1, 8)))
        >>> p.prompts(jnp.array([1, 0, 1])).shape
        (3, 3, 8)
    """

    embedding: jax.Array
    task_cols: jax.Array
    task_rows: jax.Array

    @property
    def num_tasks(self) -> int:
        """How many task prompts the node holds."""
        return self.task_cols.shape[0]

    def prompts(self, task_ids: jax.Array) -> jax.Array:
        """The ``[B, n, hidden]`` prompts of tasks ``task_ids [B]``."""
        task_ids = jnp.asarray(task_ids)
        if task_ids.ndim != 1:
            raise ValueError(f"task_ids: expected shape [B], found {task_ids.shape}")
        if not isinstance(task_ids, jax.core.Tracer):
            bad = np.asarray(task_ids)
            bad = bad[(bad < 0) | (bad >= self.num_tasks)]
            if bad.size:
                raise ValueError(
                    f"task_ids {bad.tolist()} out of range: the prompt has {self.num_tasks} tasks"
                )
        # negative ids would wrap around; send them out of bounds so they give NaN too
        ids = jnp.where(task_ids < 0, self.num_tasks, task_ids)
        cols = jnp.take(self.task_cols, ids, axis=0, mode="fill", fill_value=jnp.nan)
        rows = jnp.take(self.task_rows, ids, axis=0, mode="fill", fill_value=jnp.nan)
        return self.embedding[None] * (cols @ rows)

    def table(self, rng: jax.Array | None = None) -> jax.Array:
        """The shared ``embedding`` (what peft saves as ``prompt_embeddings``)."""
        return self.embedding

    def prompt_embeddings(self, batch_size: int, ctx: Context) -> jax.Array:
        """Each row's task prompt ``[B, n, hidden]``, tasks from ``ctx.task_ids``."""
        if ctx.task_ids is None:
            raise ValueError("a multitask prompt needs task_ids [B]: pass task_ids= to the forward")
        if jnp.shape(ctx.task_ids) != (batch_size,):
            raise ValueError(
                f"task_ids: expected shape ({batch_size},), found {jnp.shape(ctx.task_ids)}"
            )
        return self.prompts(ctx.task_ids)


@node(trainable=("embedding",), static=("kv_heads", "head_dim"), decay=())
class Prefix(_FlatPrefix, Node):
    """Key/value prefixes ``embedding [n, layers * 2 * kv_heads * head_dim]`` (peft's layout).

    Viewed as ``[n, layers, 2, kv_heads, head_dim]``: per layer the keys, then the
    values. The keys are used as stored (no RoPE).

    Example:
        >>> k, v = Prefix(jnp.zeros((3, 2 * 2 * 4)), 1, 4).prefix_key_values(5, Context())
        >>> k.shape
        (2, 5, 3, 1, 4)
    """

    embedding: jax.Array
    kv_heads: int
    head_dim: int

    def table(self, rng: jax.Array | None = None) -> jax.Array:
        """The flat ``[n_virtual, layers * 2 * kv_heads * head_dim]`` prefix."""
        return self.embedding


@node(trainable=("embedding", "encoder"), static=("kv_heads", "head_dim"), decay=("encoder",))
class ProjectedPrefix(_FlatPrefix, Node):
    """Prefix tuning with reparameterization: ``embedding [n, kv_heads * head_dim]`` then
    ``Linear -> tanh -> Linear`` to the flat ``[n, layers * 2 * kv_heads * head_dim]``.

    Example:
        >>> enc = encoders.init_projection(jax.random.key(0), 4, 6, 2 * 2 * 4)
        >>> ProjectedPrefix(jnp.zeros((3, 4)), enc, 1, 4).table().shape
        (3, 16)
    """

    embedding: jax.Array
    encoder: dict[str, Any]
    kv_heads: int
    head_dim: int

    def table(self, rng: jax.Array | None = None) -> jax.Array:
        """The projected flat prefix ``[n_virtual, layers * 2 * kv_heads * head_dim]``."""
        return encoders.projection(self.encoder, self.embedding)


@jax.jit
def export_table(prompt: Any) -> jax.Array:
    """``prompt.table()`` compiled once per node structure (what the adapter file holds).

    Example:
        >>> export_table(SoftPrompt(jnp.ones((2, 3)))).shape
        (2, 3)
    """
    return prompt.table()


def install(params: Params, entry: str, prompt: Any) -> Params:
    """``params`` plus ``params[entry] = prompt``; refuses to replace an existing entry.

    Example:
        >>> sorted(install({"a": 1}, "prompt", 2))
        ['a', 'prompt']
    """
    if entry in params:
        raise ValueError(f"params already hold a {entry!r} entry ({type(params[entry]).__name__})")
    return {**params, entry: prompt}


def entry_node(params: Params, entry: str, types: tuple[type, ...], owner: str) -> Any:
    """``params[entry]``, checked to be one of ``types``.

    Example:
        >>> entry_node({"prompt": 1}, "prompt", (SoftPrompt,), "PromptTuning")
        Traceback (most recent call last):
        ValueError: PromptTuning: params['prompt'] is int; expected ['SoftPrompt']
    """
    found = params.get(entry)
    if isinstance(found, NamedAdapters):
        raise ValueError(
            f"{owner}: params[{entry!r}] holds named adapters {list(found.names)}; save one "
            "with jpeft.prompts.named.save_adapter(out_dir, method, params, cfg, name)"
        )
    if not isinstance(found, types):
        names = [t.__name__ for t in types]
        raise ValueError(f"{owner}: params[{entry!r}] is {type(found).__name__}; expected {names}")
    return found


def table_tensors(
    params: Params, entry: str, types: tuple[type, ...], owner: str
) -> dict[str, np.ndarray]:
    """What peft saves of ``params[entry]``: its ``table()`` as ``prompt_embeddings``.

    Example:
        >>> table_tensors({"prompt": SoftPrompt(jnp.ones((2, 3)))}, "prompt", (SoftPrompt,), "x")
        {'prompt_embeddings': array([[1., 1., 1.],
               [1., 1., 1.]], dtype=float32)}
    """
    table = export_table(entry_node(params, entry, types, owner))
    return {TABLE: np.asarray(table, np.float32)}
