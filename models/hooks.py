"""The protocol between the model and the nodes PEFT methods put in its params.

The model never imports a method. A node a method places in the params tree derives
from :class:`ParamNode` and declares on its own class what it does in the forward
pass: how it multiplies (:meth:`ParamNode.matmul`), the plain tensor it stands for
(:meth:`ParamNode.dense`), and the forward hooks below. The model calls the
dispatching functions (:func:`jpeft.models.linear.matmul`, :func:`~jpeft.models.linear.dense`
and the four hooks here), which call the node's method; types that do not derive from
:class:`ParamNode` may register implementations instead (``@prompt_embeddings.register(T)``).

Where the hooks enter (``L`` layers, ``B`` rows, ``n`` virtual tokens):

=====================  ==============================================  =====================
params entry           hook                                            used by
=====================  ==============================================  =====================
any top-level entry    :func:`prompt_embeddings` -> ``[B, n, H]``      prompt tuning, P-tuning
any top-level entry    :func:`prefix_key_values` -> 2x ``[L,B,n,K,D]`` prefix tuning, P-tuning v2
``per_layer`` entries  :func:`adaption_output` -> ``[B, T, H]``        LLaMA-Adapter
``layers.adapter_*``   :func:`adapter_output` -> ``h`` (sub-layer)     bottleneck adapters
=====================  ==============================================  =====================

Top-level entries other than the base layout's are asked for prompt embeddings and
key/value prefixes; a node whose class sets ``per_layer = True`` carries a leading
layer axis, is sliced by the layer scan with the layer's params, and is asked for
:func:`adaption_output` in every layer.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, ClassVar

import jax
import jax.numpy as jnp

from jpeft.models.context import Context
from jpeft.models.param_spec import BASE_ENTRIES
from jpeft.models.pytree import Params


class ParamNode:
    """Base of every node in a params tree: what the model may ask of it.

    Each default says "this node does not do that": no dense form, no prompt, no
    prefix, no adaption output; a weight node overrides :meth:`dense` (and
    :meth:`matmul` when it multiplies without materializing the dense weight).

    Example:
        >>> class Doubled(ParamNode):
        ...     def __init__(self, w): self.w = w
        ...     def dense(self): return 2 * self.w
        >>> Doubled(jnp.eye(2)).matmul(jnp.ones((1, 2)), Context(), "q_proj").tolist()
        [[2.0, 2.0]]
    """

    per_layer: ClassVar[bool] = False
    """True when a top-level node's arrays lead with the layer axis (scanned per layer)."""

    def dense(self) -> jax.Array:
        """The plain array the node stands for (e.g. base + LoRA delta, dequantized NF4)."""
        raise TypeError(f"{type(self).__name__} stands for no dense tensor")

    def matmul(self, x: jax.Array, ctx: Context, name: str) -> jax.Array:
        """``x @ w`` for this weight node (``[in, out]``); default: through :meth:`dense`."""
        return jnp.matmul(x.astype(ctx.dtype), self.dense().astype(ctx.dtype))

    def lookup(self, ids: jax.Array, ctx: Context) -> jax.Array:
        """Rows ``ids [...]`` of the embedding table ``[vocab, hidden]`` this node stands for.

        Default: rows of :meth:`dense`; a node may gather only what it needs.
        """
        return self.dense()[ids]

    def tied_logits(self, x: jax.Array, ctx: Context) -> jax.Array:
        """Logits ``[..., vocab]`` of a tied ``lm_head`` for hidden states ``x [..., hidden]``,
        this node standing at ``embed_tokens/embedding`` (``[vocab, hidden]``). Default:
        ``x @ dense().T`` (what the node does to the input embedding reaches the output
        too, as peft's trainable tokens do)."""
        return x @ self.dense().astype(ctx.dtype).T

    def prompt_embeddings(self, batch_size: int, ctx: Context) -> jax.Array | None:
        """Virtual-token embeddings ``[B, n, hidden]`` to prepend, or None."""
        return None

    def prefix_key_values(
        self, batch_size: int, ctx: Context
    ) -> tuple[jax.Array, jax.Array] | None:
        """Key and value prefixes, each ``[layers, B, n, kv_heads, head_dim]``, or None."""
        return None

    def adapter_output(self, h: jax.Array, ctx: Context, name: str) -> jax.Array:
        """A sub-layer's output ``h [B, T, hidden]`` transformed (nodes at ``layers/adapter_*``)."""
        raise TypeError(f"{type(self).__name__} cannot stand at layers/{name}")

    def adaption_output(
        self, q: jax.Array, rope: tuple[jax.Array, jax.Array], attn: dict[str, Any], ctx: Context
    ) -> jax.Array | None:
        """What one layer adds after ``o_proj`` ``[B, T, hidden]`` (``per_layer`` nodes), or None.

        ``q [B, T, heads, head_dim]`` are the layer's queries *before* RoPE and ``rope``
        its ``(cos, sin)`` tables ``[B, T, head_dim]``: a node rotates them itself
        (:func:`jpeft.models.rope.apply_rotary_apart`), so XLA compiles the layer's own
        attention exactly as without the node. ``attn`` are the layer's attention params;
        ``self`` is this layer's slice of the node.
        """
        return None

    def unloaded(self) -> Any:
        """What stands here once the PEFT adapters are removed (:func:`jpeft.unload`).

        Asked of nodes at a base leaf's place only (entries a method added are dropped
        whole). A weight node that wraps a base (LoRA) returns that base; a node that is
        the base (an NF4 weight) returns itself. The default refuses: a node that
        replaced its tensor without keeping it cannot give the base back.
        """
        raise TypeError(
            f"{type(self).__name__} replaced a base tensor and keeps no copy of it: "
            "its params cannot give the base model back (unload / disable_adapters)"
        )

    def adapter_indices(self) -> tuple[int, ...]:
        """The indices of the named adapters on this node (what ``ctx.adapter_ids`` selects).

        A node that reads ``ctx.adapter_ids`` declares them: concrete ids are checked
        against the largest index any node declares (:mod:`jpeft.models.selection`).
        """
        return ()


def _not_a_node(hook: str, value: Any) -> TypeError:
    return TypeError(f"{hook}: {type(value).__name__} is not a ParamNode and registers no {hook}")


@functools.singledispatch
def prompt_embeddings(node: Any, batch_size: int, ctx: Context) -> jax.Array | None:
    """Virtual-token embeddings ``[B, n, hidden]`` prepended to the input embeddings, or None."""
    if isinstance(node, ParamNode):
        return node.prompt_embeddings(batch_size, ctx)
    raise _not_a_node("prompt_embeddings", node)


@functools.singledispatch
def prefix_key_values(
    node: Any, batch_size: int, ctx: Context
) -> tuple[jax.Array, jax.Array] | None:
    """Per-layer key and value prefixes, each ``[layers, B, n, kv_heads, head_dim]``, or None."""
    if isinstance(node, ParamNode):
        return node.prefix_key_values(batch_size, ctx)
    raise _not_a_node("prefix_key_values", node)


@functools.singledispatch
def adapter_output(node: Any, h: jax.Array, ctx: Context, name: str) -> jax.Array:
    """Transform a sub-layer's output ``h [B, T, hidden]`` before the residual add.

    ``name`` is ``"adapter_attn"`` (after self-attention) or ``"adapter_mlp"``.
    """
    if isinstance(node, ParamNode):
        return node.adapter_output(h, ctx, name)
    raise _not_a_node("adapter_output", node)


@functools.singledispatch
def adaption_output(
    node: Any, q: jax.Array, rope: tuple[jax.Array, jax.Array], attn: dict[str, Any], ctx: Context
) -> jax.Array | None:
    """What a ``per_layer`` node adds after ``o_proj`` in one layer ``[B, T, hidden]``, or None."""
    if isinstance(node, ParamNode):
        return node.adaption_output(q, rope, attn, ctx)
    raise _not_a_node("adaption_output", node)


@dataclasses.dataclass(frozen=True)
class MethodInputs:
    """What the PEFT entries of a params tree give one forward call.

    Attributes:
        prompt: virtual tokens ``[B, n, hidden]`` to prepend (all entries' prompts,
            in entry order), or None.
        prefix: keys and values ``[L, B, n, kv_heads, head_dim]`` to prepend in every
            layer, or None.
        per_layer: the ``per_layer`` nodes by entry name, scanned with the layers.
    """

    prompt: jax.Array | None
    prefix: tuple[jax.Array, jax.Array] | None
    per_layer: dict[str, Any]


def method_inputs(params: Params, batch_size: int, ctx: Context, prefill: bool) -> MethodInputs:
    """Ask every top-level entry outside the base layout for its forward inputs, alike.

    Prompts are asked for only when ``prefill`` (the first call on a cache, or no
    cache). Raises ``ValueError`` for an entry that takes no part in the forward pass.

    Example:
        >>> method_inputs({"embed_tokens": {}, "layers": {}}, 2, Context(), True).prompt is None
        True
    """
    prompts, keys, values, per_layer = [], [], [], {}
    for name, entry in params.items():
        if name in BASE_ENTRIES:
            continue
        prompt = prompt_embeddings(entry, batch_size, ctx) if prefill else None
        prefix = prefix_key_values(entry, batch_size, ctx)
        if getattr(entry, "per_layer", False):
            per_layer[name] = entry
        elif prefill and prompt is None and prefix is None:
            raise ValueError(
                f"params[{name!r}] ({type(entry).__name__}) takes no part in the forward pass: "
                "a top-level PEFT entry must give a prompt, a prefix or be per_layer"
            )
        if prompt is not None:
            prompts.append(prompt.astype(ctx.dtype))
        if prefix is not None:
            keys.append(prefix[0])
            values.append(prefix[1])
    return MethodInputs(
        prompt=jnp.concatenate(prompts, axis=1) if prompts else None,
        prefix=(jnp.concatenate(keys, axis=2), jnp.concatenate(values, axis=2)) if keys else None,
        per_layer=per_layer,
    )


def prompt_length(params: Params, batch_size: int, ctx: Context) -> int:
    """How many virtual tokens the entries of ``params`` prepend (cache slots they take).

    Example:
        >>> prompt_length({"embed_tokens": {}}, 2, Context())
        0
    """
    shape = jax.eval_shape(lambda p: method_inputs(p, batch_size, ctx, prefill=True).prompt, params)
    return 0 if shape is None else int(shape.shape[1])
