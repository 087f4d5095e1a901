"""peft's fully trained modules and trainable tokens next to a LoRA adapter.

``LoraConfig(modules_to_save=[...])`` trains a full copy of a module; jpeft puts a
:class:`jpeft.Trained` node at its weight (``embed_tokens`` or ``lm_head``). peft
matches the names as suffixes of full module names (``key.endswith(name)``,
``peft.utils.other._set_trainable``) and saves the copy under the module's own name
with the adapter's name stripped, in transformers' layout::

    base_model.model.model.embed_tokens.weight   [vocab, hidden]
    base_model.model.lm_head.weight              [vocab, hidden]

``trainable_token_indices`` (peft's ``TrainableTokensLayer``) trains only some rows of
the input embedding: a :class:`TrainableTokens` node holding those rows, saved as
``base_model.model.model.embed_tokens.token_adapter.trainable_tokens_delta [n, hidden]``.
On a model with tied embeddings peft ties the rows to ``lm_head`` as well, and so does
the node (its ``tied_logits`` multiply by the adapted table).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jpeft.adapter_files import PEFT_PREFIX, AdapterConfig, AdapterTensors
from jpeft.models.config import LlamaConfig
from jpeft.models.context import Context
from jpeft.models.linear import dense, lookup
from jpeft.models.param_spec import TOP_MODULES, top_module
from jpeft.models.pytree import Axes, Params, get_path, replace_paths
from jpeft.nodes import Node, Trained, node

TOKENS_KEY = "token_adapter.trainable_tokens_delta"


@node(trainable=("delta",), static=("indices",))
class TrainableTokens(Node):
    """Rows ``indices`` of an embedding table trained apart: ``W[indices] := delta``.

    ``base [vocab, hidden]`` is frozen, ``delta [n, hidden]`` trainable (initialized to
    the base's rows, as peft does). Its weights replace the rows; they are not added.

    Example:
        >>> t = TrainableTokens(jnp.zeros((4, 2)), jnp.ones((1, 2)), indices=(2,))
        >>> t.lookup(jnp.array([1, 2]), Context()).tolist()
        [[0.0, 0.0], [1.0, 1.0]]
    """

    base: Any
    delta: jax.Array
    indices: tuple[int, ...]

    def dense(self) -> jax.Array:
        base = dense(self.base)
        return base.at[np.asarray(self.indices)].set(self.delta.astype(base.dtype))

    def merged(self) -> jax.Array:
        return self.dense()

    def unloaded(self) -> Any:
        """The embedding table without the trained rows (:func:`jpeft.unload`)."""
        return self.base.unloaded() if isinstance(self.base, Node) else self.base

    def lookup(self, ids: jax.Array, ctx: Context) -> jax.Array:
        """Base rows, and ``delta``'s row wherever ``ids`` is a trained index."""
        y = lookup(self.base, ids, ctx).astype(ctx.dtype)
        hits = ids[..., None] == jnp.asarray(self.indices)  # [..., n]
        which = jnp.argmax(hits, axis=-1)
        return jnp.where(hits.any(-1)[..., None], self.delta.astype(ctx.dtype)[which], y)

    def logical_axes(self, base: Axes | None) -> TrainableTokens:
        return TrainableTokens(base=base, delta=(None, base[-1]), indices=self.indices)


def trained_modules(names: Any, source: str) -> tuple[str, ...]:
    """The modules a ``modules_to_save`` list names (peft's suffix rule), checked.

    Example:
        >>> trained_modules(["lm_head", "model.embed_tokens"], "adapter_config.json")
        ('embed_tokens', 'lm_head')
    """
    names = list(names or ())
    found = [m for m in TOP_MODULES if any(top_module(m).hf_module.endswith(n) for n in names)]
    unknown = [n for n in names if not any(top_module(m).hf_module.endswith(n) for m in found)]
    if unknown:
        raise ValueError(
            f"{source}: modules_to_save {unknown} are not supported; jpeft trains "
            f"{list(TOP_MODULES)} in full (adapt the projections with LoRA instead)"
        )
    return tuple(found)


def token_indices(value: Any, source: str) -> tuple[int, ...]:
    """``trainable_token_indices`` as a tuple of token ids of ``embed_tokens``.

    peft takes a list (the input embedding) or a dict from module names to lists.

    Example:
        >>> token_indices({"embed_tokens": [5, 3]}, "adapter_config.json")
        (5, 3)
    """
    if isinstance(value, dict):
        other = [k for k in value if not top_module("embed_tokens").hf_module.endswith(k)]
        if other:
            raise ValueError(
                f"{source}: trainable_token_indices for {other}: jpeft trains tokens of "
                "embed_tokens only"
            )
        value = [i for v in value.values() for i in v]
    value = tuple(value or ())
    if not all(isinstance(i, int) and not isinstance(i, bool) for i in value):
        raise ValueError(f"{source}: trainable_token_indices {value!r}; expected token ids")
    return value


def check(modules: tuple[str, ...], tokens: tuple[int, ...], cfg: LlamaConfig) -> None:
    """Refuse what jpeft cannot give as peft does, naming the option."""
    bad = [i for i in tokens if not 0 <= i < cfg.vocab_size]
    if bad or len(set(tokens)) != len(tokens):
        raise ValueError(
            f"LoRA: trainable_token_indices {list(tokens)} must be distinct ids in "
            f"[0, {cfg.vocab_size})"
        )
    if tokens and "embed_tokens" in modules:
        raise ValueError("LoRA: embed_tokens is both in modules_to_save and trainable tokens")
    if cfg.tie_word_embeddings and modules:
        raise ValueError(
            f"LoRA: modules_to_save {list(modules)} on a model with tied embeddings: peft "
            "trains a copy that unties them; load the model with tie_word_embeddings=False"
        )


def add(params: Params, modules: tuple[str, ...], tokens: tuple[int, ...]) -> Params:
    """``params`` with ``modules`` trained in full and ``tokens`` rows trainable."""
    updates: dict[tuple[str, ...], Any] = {}
    for module in modules:
        path = top_module(module).path
        updates[path] = Trained(dense(get_path(params, path)))
    if tokens:
        path = top_module("embed_tokens").path
        table = get_path(params, path)
        delta = dense(table)[np.asarray(tokens)].astype(jnp.float32)
        updates[path] = TrainableTokens(table, delta, tokens)
    return replace_paths(params, updates)


def _key(module: str) -> str:
    return PEFT_PREFIX + top_module(module).hf_module


def tensors(params: Params, modules: tuple[str, ...], tokens: tuple[int, ...]) -> dict:
    """The trained modules and token rows under peft's names, in transformers' layout."""
    out = {}
    for module in modules:
        spec = top_module(module)
        value = np.asarray(dense(get_path(params, spec.path)))
        out[f"{_key(module)}.weight"] = value.T if spec.transposed else value
    if tokens:
        node_ = get_path(params, top_module("embed_tokens").path)
        out[f"{_key('embed_tokens')}.{TOKENS_KEY}"] = np.asarray(node_.delta)
    return out


def fill(
    params: Params, found: AdapterTensors, modules: tuple[str, ...], tokens: tuple[int, ...]
) -> Params:
    """``params`` (holding the nodes of :func:`add`) with their arrays taken from ``found``."""
    updates: dict[tuple[str, ...], Any] = {}
    for module in modules:
        spec = top_module(module)
        current = get_path(params, spec.path).value
        shape = current.shape[::-1] if spec.transposed else current.shape
        value = found.take(f"{_key(module)}.weight", shape)
        updates[spec.path] = Trained(
            jnp.asarray(value.T if spec.transposed else value, current.dtype)
        )
    if tokens:
        path = top_module("embed_tokens").path
        node_ = get_path(params, path)
        delta = found.take(f"{_key('embed_tokens')}.{TOKENS_KEY}", node_.delta.shape)
        updates[path] = TrainableTokens(node_.base, jnp.asarray(delta), tokens)
    return replace_paths(params, updates)


def options(config: AdapterConfig) -> dict[str, Any]:
    """``jpeft.LoRA`` keyword arguments for these options from a peft config."""
    return {
        "modules_to_save": trained_modules(config.get("modules_to_save"), config.source),
        "trainable_token_indices": token_indices(
            config.get("trainable_token_indices"), config.source
        ),
    }
