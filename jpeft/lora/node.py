"""The LoRA weight node: a base weight plus named low-rank adapters (LoRA and DoRA).

A targeted kernel ``[L, in, out]`` becomes ``LoRAWeight(base, adapters)``. ``base``
is whatever stood there before (a plain array, an NF4 node, ...) and is only ever
used through :func:`matmul` / :func:`dense`. Each adapter holds arrays with the
same leading axes as the base (``L`` for stacked layers; the layer scan slices
them together):

* ``a [L, in, r]``, ``b [L, r, out]``: trainable; ``y = x W + scaling * x a b``.
* ``scaling [L]``: frozen; ``alpha / r`` (``alpha / sqrt(r)`` with rsLoRA; 0 where the
  layer has no adapter, whose rank is 0).
* ``layer_mask [L]``: frozen, :func:`jpeft.nodes.layer_mask`: 0 in layers the adapter
  does not touch (``layers_to_transform``, rank patterns), whose ``a``, ``b`` (and
  magnitude) receive exactly zero gradient. None on an unstacked adapter: it applies.
* ``magnitude [L, out]`` (DoRA only, else None): trainable; the output becomes
  ``m / ||W + scaling * a b||`` (column norm over ``in``, a constant for gradients
  as in peft) times ``x (W + scaling * a b)``.
* ``bias [L, out]`` (peft's ``lora_bias=True`` only, else None): trainable, a bias on
  ``b`` scaled with it: ``y = x W + scaling * (x a b + bias)``. :func:`jpeft.merge` adds
  ``scaling * bias`` to the layer's own bias (a layer without one cannot merge, as in peft).

On the embedding table ``W [vocab, hidden]`` an adapter is either the embedding's own
(peft's LoRA ``Embedding``: ``a [vocab, r]``, ``b [r, hidden]``, seen by lookups) or,
with ``tied_lm_head``, the LoRA of an ``lm_head`` tied to it (peft's LoRA ``Linear`` on
the shared weight: ``a [hidden, r]``, ``b [r, vocab]``, seen by the logits only:
``x W^T + scaling * x a b``). Merging adds both to the one table (the head's as
``(a b)^T``), so the tie is kept, as peft's ``merge_and_unload`` keeps it.

Ranks that differ across layers are zero-padded to the largest: padded columns of
``a`` and rows of ``b`` multiply each other's zeros, so their gradients are exactly
zero and they stay zero under any optimizer whose update is zero for a zero
gradient (SGD, Adam(W), LoRA+).

Several adapters may sit on one weight. :class:`LoRAAdapter` ones are *active*:
applied by default and trainable. :class:`InactiveLoRAAdapter` ones are frozen and
only used by batch rows that select them through ``ctx.adapter_ids`` (each row picks
one adapter index, -1 for the base alone).
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from jpeft.models.context import Context
from jpeft.models.linear import dense, lookup, matmul, tied_logits
from jpeft.models.pytree import Axes
from jpeft.nodes import Node, is_node, node


@node(
    trainable=("a", "b", "magnitude", "bias"),
    static=("name", "index", "dropout", "tied_lm_head"),
    decay=("a", "b"),
    lora_plus=("b",),
)
class LoRAAdapter(Node):
    """One named, active adapter on one projection (see the module docstring for shapes).

    ``index`` is the adapter's position in the params-wide adapter list (what
    ``ctx.adapter_ids`` refers to); ``dropout`` the rate on its input branch. ``a`` and
    ``b`` take weight decay, DoRA's magnitude does not; LoRA+ trains ``b`` faster.

    Example:
        >>> ad = LoRAAdapter(jnp.ones((4, 2)), jnp.zeros((2, 3)), jnp.float32(2.0), None,
        ...                  name="default", index=0, dropout=0.0)
        >>> LoRAWeight(jnp.eye(4, 3), (ad,)).merged().shape
        (4, 3)
    """

    a: jax.Array
    b: jax.Array
    scaling: jax.Array
    magnitude: jax.Array | None
    name: str
    index: int
    dropout: float
    layer_mask: jax.Array | None = None
    bias: jax.Array | None = None
    tied_lm_head: bool = False


@node(static=("name", "index", "dropout", "tied_lm_head"))
class InactiveLoRAAdapter(LoRAAdapter):
    """A loaded adapter that is not active: frozen, and used only by rows that select it.

    Example:
        >>> ad = InactiveLoRAAdapter(jnp.ones((4, 2)), jnp.ones((2, 3)), jnp.float32(1.0),
        ...                          None, name="b", index=1, dropout=0.0)
        >>> bool((LoRAWeight(jnp.eye(4, 3), (ad,)).merged() == jnp.eye(4, 3)).all())
        True
    """


def _is_active(adapter: LoRAAdapter) -> bool:
    """True for adapters applied by default (and trained)."""
    return not isinstance(adapter, InactiveLoRAAdapter)


@node()
class LoRAWeight(Node):
    """A weight node: ``base`` plus the low-rank ``adapters`` on it.

    Example:
        >>> ad = LoRAAdapter(jnp.ones((4, 2)), jnp.ones((2, 3)), jnp.float32(0.5), None,
        ...                  name="default", index=0, dropout=0.0)
        >>> w = LoRAWeight(jnp.zeros((4, 3)), (ad,))
        >>> dense(w)[0].tolist()
        [1.0, 1.0, 1.0]
    """

    base: Any
    adapters: tuple[LoRAAdapter, ...]

    @property
    def names(self) -> tuple[str, ...]:
        """The names of the adapters on this weight."""
        return tuple(ad.name for ad in self.adapters)

    def adapter(self, name: str, tied_lm_head: bool = False) -> LoRAAdapter:
        """The adapter called ``name`` (of a tied ``lm_head`` if ``tied_lm_head``).

        Raises ``ValueError`` listing the names if absent.
        """
        for ad in self.adapters:
            if ad.name == name and ad.tied_lm_head == tied_lm_head:
                return ad
        raise ValueError(f"LoRA: no adapter {name!r} on this weight; it holds {list(self.names)}")

    def merged(self) -> jax.Array | LoRAWeight:
        """The base with every active adapter folded in (inactive ones are dropped).

        An active adapter with a ``bias`` cannot fold into the kernel alone: the node is
        returned as it is (:func:`jpeft.merge` folds it with the layer's bias through
        :meth:`bias_merged`).

        With adapters ``k`` (``L_k = scaling_k a_k b_k``; DoRA factor ``f_k``, 1 for
        plain LoRA): ``W' = W (1 + sum_k (f_k - 1)) + sum_k f_k L_k``, which is
        exactly what :func:`matmul` computes. A packed base (an NF4 node) is dequantized
        first, with a warning: the result is dense, and requantizing it would round.
        """
        if self.bias_merged()[1] is not None:
            return self
        return self._merged_kernel()

    def _merged_kernel(self) -> jax.Array:
        """The kernel with every active adapter folded in (their biases left out)."""
        base = dense(self.base)
        if isinstance(self.base, Node):
            warnings.warn(
                f"merging LoRA into a {type(self.base).__name__} base gives a dense "
                f"{base.dtype} weight; quantizing the merged model again rounds the adapter's "
                "update away in part (outputs change): export it in 16 or 32 bits",
                stacklevel=2,
            )
        w = base.astype(jnp.float32)
        growth, added = _merge_terms(self.adapters, w)
        return (w * growth + added).astype(base.dtype)

    def dense(self) -> jax.Array:
        """The merged kernel ``[..., in, out]`` (adapter biases are not part of a kernel)."""
        return self._merged_kernel()

    def bias_merged(self) -> tuple[LoRAWeight, jax.Array | None]:
        """``(node without adapter biases, sum of active adapters' scaling * bias [..., out])``.

        The sum is None when no active adapter has a bias (peft's ``lora_bias=False``).
        """
        biased = [ad for ad in filter(_is_active, self.adapters) if ad.bias is not None]
        if not biased:
            return self, None
        delta = sum(
            _scale(ad, jnp.float32)[..., None] * ad.bias.astype(jnp.float32) for ad in biased
        )
        adapters = tuple(
            dataclasses.replace(ad, bias=None) if _is_active(ad) else ad for ad in self.adapters
        )
        return LoRAWeight(self.base, adapters), delta

    def unloaded(self) -> Any:
        """The base this node wraps, itself unloaded (:func:`jpeft.unload`)."""
        return self.base.unloaded() if is_node(self.base) else self.base

    def adapter_indices(self) -> tuple[int, ...]:
        """The params-wide indices of the adapters on this weight."""
        return tuple(ad.index for ad in self.adapters)

    def matmul(self, x: jax.Array, ctx: Context, name: str) -> jax.Array:
        """``x (W + sum of the adapters)``; with ``ctx.adapter_ids`` each row takes its own."""
        y = matmul(self.base, x, ctx, name)
        return self._plus_adapters(
            y, ctx, False, lambda ad: _adapter_output(self, ad, x, y, ctx, name)
        )

    def lookup(self, ids: jax.Array, ctx: Context) -> jax.Array:
        """Embedding rows ``[..., hidden]`` (peft's LoRA ``Embedding``): ``W[ids] + s a[ids] b``.

        ``a [vocab, r]`` is peft's ``lora_embedding_A`` transposed, ``b [r, hidden]``
        its ``lora_embedding_B`` transposed; no dropout (peft applies none there). The
        adapters of a tied ``lm_head`` do not reach the lookup (nor in peft).
        """
        y = lookup(self.base, ids, ctx).astype(ctx.dtype)

        def delta(ad: LoRAAdapter) -> jax.Array:
            return (ad.a.astype(ctx.dtype)[ids] @ ad.b.astype(ctx.dtype)) * _scale(ad, ctx.dtype)

        return self._plus_adapters(y, ctx, False, delta)

    def tied_logits(self, x: jax.Array, ctx: Context) -> jax.Array:
        """Logits ``[..., vocab]`` of a tied ``lm_head``: ``x W^T + scaling * dropout(x) a b``.

        Only the ``tied_lm_head`` adapters take part: an embedding LoRA reaches a tied
        ``lm_head`` not at all (peft's LoRA ``Linear`` on ``lm_head`` wraps the shared
        weight, its ``Embedding`` on ``embed_tokens`` adapts the lookup only).
        """
        y = tied_logits(self.base, x, ctx)
        return self._plus_adapters(
            y, ctx, True, lambda ad: _adapter_output(self, ad, x, y, ctx, "lm_head")
        )

    def _plus_adapters(
        self,
        y: jax.Array,
        ctx: Context,
        tied_lm_head: bool,
        delta: Callable[[LoRAAdapter], jax.Array],
    ) -> jax.Array:
        """``y`` plus ``delta(ad)`` of each adapter applied here (``tied_lm_head`` ones or not).

        Without ``ctx.adapter_ids`` the active adapters apply; with them each row takes
        the adapter whose index it holds.
        """
        ids = ctx.adapter_ids
        for ad in self.adapters:
            if ad.tied_lm_head != tied_lm_head or (ids is None and not _is_active(ad)):
                continue
            if ids is None:
                y = y + delta(ad)
            else:
                rows = (ids == ad.index).reshape(ids.shape + (1,) * (y.ndim - ids.ndim))
                y = y + jnp.where(rows, delta(ad), 0)
        return y

    def logical_axes(self, base: Axes | None) -> LoRAWeight:
        """``a`` takes the base's input axis, ``b`` its output axis; the base keeps its own.

        Works on either part of :func:`jpeft.split` too (absent fields stay None).
        """
        lead, (axis_in, axis_out) = base[:-2], base[-2:]
        axes = {
            "a": (*lead, axis_in, None),
            "b": (*lead, None, axis_out),
            "scaling": lead,
            "layer_mask": lead,
            "magnitude": (*lead, axis_out),
            "bias": (*lead, axis_out),
        }

        head_axes = {**axes, "a": (*lead, axis_out, None), "b": (*lead, None, axis_in)}

        def adapter_axes(ad: LoRAAdapter | None) -> LoRAAdapter | None:
            if ad is None:
                return None
            own = head_axes if ad.tied_lm_head else axes
            return dataclasses.replace(
                ad, **{k: None if getattr(ad, k) is None else v for k, v in own.items()}
            )

        inner = self.base.logical_axes(base) if is_node(self.base) else base
        return LoRAWeight(base=inner, adapters=tuple(map(adapter_axes, self.adapters)))


def _low_rank(adapter: LoRAAdapter) -> jax.Array:
    """``scaling * a @ b`` in fp32, broadcast over the leading axes: ``[..., in, out]``.

    Transposed for a tied ``lm_head``'s adapter, to the table's ``[vocab, hidden]``.
    """
    ab = adapter.a.astype(jnp.float32) @ adapter.b.astype(jnp.float32)
    ab = jnp.swapaxes(ab, -1, -2) if adapter.tied_lm_head else ab
    return _scale(adapter, jnp.float32)[..., None, None] * ab


def _scale(adapter: LoRAAdapter, dtype: jnp.dtype) -> jax.Array:
    """``scaling`` times the layer mask (0 in layers without the adapter)."""
    scale = adapter.scaling.astype(dtype)
    return scale if adapter.layer_mask is None else scale * adapter.layer_mask.astype(dtype)


def _dora_factor(adapter: LoRAAdapter, w: jax.Array, lowrank: jax.Array) -> jax.Array:
    """DoRA's ``m / ||W + scaling a b||`` per output ``[..., out]``; 1 where untouched.

    The norm runs over the input axis (peft: ``torch.linalg.norm(W_torch, dim=1)``) and
    is a constant for gradients (peft detaches it, DoRA paper section 4.3).
    """
    norm = jax.lax.stop_gradient(jnp.linalg.norm(w + lowrank, axis=-2))
    factor = adapter.magnitude.astype(jnp.float32) / norm
    mask = jnp.ones_like(adapter.scaling) if adapter.layer_mask is None else adapter.layer_mask
    touched = (mask > 0)[..., None]
    return jnp.where(touched, factor, 1.0)


def _merge_terms(adapters: tuple[LoRAAdapter, ...], w: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``(1 + sum_k (f_k - 1), sum_k f_k L_k)`` over the active adapters, for fp32 base ``w``.

    The merged weight is ``w * growth + added`` (``growth`` ``[..., 1, out]``).
    """
    growth = jnp.ones((*w.shape[:-2], 1, w.shape[-1]), jnp.float32)
    added = jnp.zeros_like(w)
    for ad in filter(_is_active, adapters):
        lowrank = _low_rank(ad)
        if ad.magnitude is None:
            added = added + lowrank
        else:
            factor = _dora_factor(ad, w, lowrank)[..., None, :]
            growth = growth + factor - 1.0
            added = added + factor * lowrank
    return growth, added


def _adapter_output(
    w: LoRAWeight, ad: LoRAAdapter, x: jax.Array, base_out: jax.Array, ctx: Context, name: str
) -> jax.Array:
    """What adapter ``ad`` adds to the base output ``base_out = x W`` (no bias)."""
    x = x.astype(ctx.dtype)
    rng = ctx.module_rng(name)
    dropping = ad.dropout > 0 and rng is not None
    if dropping:
        keep = jax.random.bernoulli(jax.random.fold_in(rng, ad.index), 1.0 - ad.dropout, x.shape)
        x = jnp.where(keep, x / (1.0 - ad.dropout), 0.0).astype(ctx.dtype)
    lora = (x @ ad.a.astype(ctx.dtype)) @ ad.b.astype(ctx.dtype)
    if ad.bias is not None:
        lora = lora + ad.bias.astype(ctx.dtype)
    lora = lora * _scale(ad, ctx.dtype)
    if ad.magnitude is None:
        return lora
    weight = dense(w.base).astype(jnp.float32)
    factor = _dora_factor(ad, weight, _low_rank(ad)).astype(ctx.dtype)
    # peft: with dropout active the base term is recomputed on the dropped input.
    base_term = matmul(w.base, x, ctx, name) if dropping else base_out
    return (factor - 1) * base_term + factor * lora


def unmerge(merged: Any, lora_params: Any) -> Any:
    """Undo :func:`jpeft.merge`: ``lora_params`` with each LoRA node's base taken from ``merged``.

    Plain LoRA needs only the adapters (the nodes' ``base`` may be None): the
    base is ``merged - sum_k scaling_k a_k b_k``. DoRA's factor depends on the base's
    column norms, which merging loses (peft caches them); there the node's base
    must still be present. Restored bases are plain arrays in ``merged``'s dtype.

    Example:
        >>> import jax, jpeft
        >>> from jpeft.models import hf, llama
        >>> cfg, base = hf.load_pretrained("assets/tiny-llama")
        >>> params = jpeft.LoRA(r=2).init(jax.random.key(0), base, cfg)
        >>> merged = jpeft.merge(params)
        >>> restored = jpeft.unmerge(merged, params)
        >>> float(jnp.abs(restored["layers"]["self_attn"]["q_proj"]["kernel"].base
        ...               - base["layers"]["self_attn"]["q_proj"]["kernel"]).max()) < 1e-6
        True
    """

    def restore(weight: Any, m: Any) -> Any:
        if not isinstance(weight, LoRAWeight):
            return weight
        m32 = jnp.asarray(m, jnp.float32)
        dora = any(ad.magnitude is not None for ad in filter(_is_active, weight.adapters))
        if dora and weight.base is None:
            raise ValueError(
                "unmerge: a DoRA adapter cannot be unmerged without its base weight (merging "
                "loses the base's column norms); pass params whose LoRA nodes hold their base"
            )
        w = dense(weight.base).astype(jnp.float32) if dora else m32
        growth, added = _merge_terms(weight.adapters, w)
        return LoRAWeight(((m32 - added) / growth).astype(jnp.asarray(m).dtype), weight.adapters)

    return jax.tree.map(restore, lora_params, merged, is_leaf=is_node)
