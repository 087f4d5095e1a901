"""Several named prompt-learning or LLaMA-Adapter adapters in one params tree.

peft holds several prompt-tuning, prefix-tuning, P-tuning or adaption-prompt adapters in
one model (``add_adapter`` / ``load_adapter(adapter_name=...)``), uses the active one in
a forward pass (``set_adapter``) and saves each one as its own adapter directory. Here a
top-level entry (``params["prompt"]``, ``["prefix"]`` or ``["adaption"]``) becomes a
:class:`NamedAdapters` node holding one node per adapter: the active one answers the
forward hooks and trains; the others are frozen copies (``Inactive<Node>`` classes whose
fields do not train, so :func:`jpeft.split` leaves them in the frozen part).

Unlike peft, adding an adapter makes it the active one (as ``jpeft.LoRA(adapter_name=...)``
does). A forward with ``ctx.adapter_ids [B]`` (``Llama.apply(..., adapter_ids=ids)``, ids
from :func:`adapter_ids`) gives each row the adapter of that index, which peft does not
offer for these methods: every adapter is evaluated for the whole batch and selected per
row. Soft prompts and prefixes must then all have one length, and every row needs one of
them (a row cannot go without its virtual tokens in a batch of fixed shape); LLaMA-Adapter
rows may take id -1, the base.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jpeft.hf_adapter import load_hf_adapter, save_hf_adapter
from jpeft.method import Method
from jpeft.models.config import LlamaConfig
from jpeft.models.context import Context
from jpeft.models.param_spec import BASE_ENTRIES
from jpeft.models.pytree import Params
from jpeft.nodes import Node, node

BASE = "__base__"
DEFAULT = "default"  # the name of an adapter that was added without one (peft's default)


@functools.cache
def inactive_class(cls: type[Node]) -> type[Node]:
    """The frozen twin of node class ``cls``: the same fields and hooks, none trainable.

    Example:
        >>> from jpeft.prompts.nodes import SoftPrompt
        >>> inactive_class(SoftPrompt).__name__, inactive_class(SoftPrompt).trainable_fields
        ('InactiveSoftPrompt', ())
    """
    static = tuple(f.name for f in dataclasses.fields(cls) if f.name not in cls.data_fields)
    doc = f"A {cls.__name__} that is not the active adapter: frozen, used only by rows naming it."
    body = {"__module__": __name__, "__doc__": doc, "active_class": cls}
    return node(static=static)(type(f"Inactive{cls.__name__}", (cls,), body))


def _as_class(adapter: Node, cls: type[Node]) -> Node:
    if type(adapter) is cls:
        return adapter
    return cls(**{f.name: getattr(adapter, f.name) for f in dataclasses.fields(adapter)})


def _active_class(adapter: Node) -> type[Node]:
    return getattr(type(adapter), "active_class", type(adapter))


@node(static=("names",))
class NamedAdapters(Node):
    """One params entry holding several named adapter nodes; exactly one is active.

    ``adapters[i]`` is called ``names[i]`` (``i`` is its index in ``ctx.adapter_ids``).
    The forward hooks go to the active adapter, or per row with ``ctx.adapter_ids``.

    Example:
        >>> from jpeft.prompts.nodes import SoftPrompt
        >>> two = NamedAdapters((SoftPrompt(jnp.ones((2, 4))),), ("a",)).added(
        ...     SoftPrompt(jnp.zeros((2, 4))), "b")
        >>> two.active_name, two.prompt_embeddings(3, Context()).shape
        ('b', (3, 2, 4))
        >>> float(two.activated("a").prompt_embeddings(1, Context()).sum())
        8.0
    """

    adapters: tuple[Node, ...]
    names: tuple[str, ...]

    @property
    def active(self) -> Node:
        """The active adapter's node."""
        return next(a for a in self.adapters if _active_class(a) is type(a))

    @property
    def active_name(self) -> str:
        """The active adapter's name."""
        return self.names[self.adapters.index(self.active)]

    @property
    def per_layer(self) -> bool:  # type: ignore[override]
        """True when the adapters carry a leading layer axis (LLaMA-Adapter)."""
        return all(getattr(a, "per_layer", False) for a in self.adapters)

    def adapter_indices(self) -> tuple[int, ...]:
        """The indices ``ctx.adapter_ids`` selects these adapters by (their positions)."""
        return tuple(range(len(self.names)))

    def adapter(self, name: str) -> Node:
        """Adapter ``name`` as an active (trainable) node; ``ValueError`` listing the names."""
        if name not in self.names:
            raise ValueError(f"no adapter {name!r}; this entry holds {list(self.names)}")
        found = self.adapters[self.names.index(name)]
        return _as_class(found, _active_class(found))

    def activated(self, name: str) -> NamedAdapters:
        """The same adapters with ``name`` the active one (the others frozen)."""
        self.adapter(name)  # checks the name
        adapters = tuple(
            _as_class(a, _active_class(a) if n == name else inactive_class(_active_class(a)))
            for a, n in zip(self.adapters, self.names, strict=True)
        )
        return NamedAdapters(adapters, self.names)

    def added(self, adapter: Node, name: str) -> NamedAdapters:
        """These adapters plus ``adapter`` called ``name``, which becomes the active one."""
        if not name or name == BASE:
            raise ValueError(f"adapter name {name!r} is reserved or empty")
        if name in self.names:
            raise ValueError(f"params already hold an adapter named {name!r}")
        return NamedAdapters((*self.adapters, adapter), (*self.names, name)).activated(name)

    def prompt_embeddings(self, batch_size: int, ctx: Context) -> jax.Array | None:
        """The active adapter's ``[B, n, hidden]`` prompt, or each row's with adapter ids."""
        if ctx.adapter_ids is None:
            return self.active.prompt_embeddings(batch_size, ctx)
        rows = [a.prompt_embeddings(batch_size, ctx) for a in self.adapters]
        return self._by_row(rows, ctx.adapter_ids, batch_axis=0, base_allowed=False)

    def prefix_key_values(
        self, batch_size: int, ctx: Context
    ) -> tuple[jax.Array, jax.Array] | None:
        """The active adapter's ``[L, B, n, kv_heads, head_dim]`` prefixes, or each row's."""
        if ctx.adapter_ids is None:
            return self.active.prefix_key_values(batch_size, ctx)
        kv = [a.prefix_key_values(batch_size, ctx) for a in self.adapters]
        if kv[0] is None:
            return None
        keys, values = zip(*kv, strict=True)
        pick = functools.partial(
            self._by_row, ids=ctx.adapter_ids, batch_axis=1, base_allowed=False
        )
        return pick(list(keys)), pick(list(values))

    def adaption_output(
        self, q: jax.Array, rope: tuple[jax.Array, jax.Array], attn: dict[str, Any], ctx: Context
    ) -> jax.Array | None:
        """The active adapter's output ``[B, T, hidden]`` in this layer, or each row's."""
        if ctx.adapter_ids is None:
            return self.active.adaption_output(q, rope, attn, ctx)
        rows = [a.adaption_output(q, rope, attn, ctx) for a in self.adapters]
        return self._by_row(rows, ctx.adapter_ids, batch_axis=0, base_allowed=True)

    def _by_row(
        self, outputs: list[jax.Array | None], ids: jax.Array, batch_axis: int, base_allowed: bool
    ) -> jax.Array | None:
        """Row ``b`` of adapter ``ids[b]``'s output (zeros for -1 where allowed, else NaN)."""
        if all(o is None for o in outputs):
            return None
        shapes = {tuple(o.shape) for o in outputs}
        if len(shapes) != 1:
            raise ValueError(
                f"per-row adapter ids need outputs of one shape; adapters {list(self.names)} "
                f"give {[tuple(o.shape) for o in outputs]} (use one number of virtual tokens)"
            )
        ids = jnp.asarray(ids)
        if not isinstance(ids, jax.core.Tracer):
            low = -1 if base_allowed else 0
            bad = sorted({int(i) for i in np.asarray(ids) if not low <= i < len(self.names)})
            if bad:
                raise ValueError(
                    f"adapter_ids {bad} out of range: this entry holds {list(self.names)}"
                    + ("" if base_allowed else " and every row needs one of them (no base rows)")
                )
        shape = [1] * outputs[0].ndim
        shape[batch_axis] = ids.shape[0]
        ids = ids.reshape(shape)
        out = jnp.full_like(outputs[0], 0.0 if base_allowed else jnp.nan)
        for index, o in enumerate(outputs):
            out = jnp.where(ids == index, o, out)
        return out


def _entries(params: Params) -> dict[str, Any]:
    """The top-level PEFT entries of ``params`` (everything outside the base layout)."""
    return {k: v for k, v in params.items() if k not in BASE_ENTRIES}


def _install(params: Params, base: Params, new: Params, name: str, owner: str) -> Params:
    """``params`` with the one entry ``new`` adds to ``base`` added as adapter ``name``."""
    added = [k for k in new if k not in base]
    changed = [k for k in base if new[k] is not base[k]]
    if len(added) != 1 or changed:
        raise ValueError(
            f"{owner}: only prompt-learning and LLaMA-Adapter methods add named adapters this way "
            f"(the method added {added} and changed {changed}); for LoRA use "
            "jpeft.LoRA(adapter_name=...) or jpeft.lora.load_adapter"
        )
    entry = added[0]
    fresh = new[entry]
    held = params.get(entry)
    if held is None:
        if not name or name == BASE:
            raise ValueError(f"{owner}: adapter name {name!r} is reserved or empty")
        return {**params, entry: NamedAdapters((fresh,), (name,))}
    if not isinstance(held, NamedAdapters):
        held = NamedAdapters((held,), (DEFAULT,))
    return {**params, entry: held.added(fresh, name)}


def _base(params: Params) -> Params:
    return {k: v for k, v in params.items() if k in BASE_ENTRIES}


def add_adapter(
    key: jax.Array, params: Params, cfg: LlamaConfig, method: Method, name: str
) -> Params:
    """``params`` plus a new adapter of ``method`` called ``name``, made the active one.

    An adapter already in ``params`` without a name (from ``method.init``) is called
    ``"default"``. Raises ``ValueError`` for a taken name or a method that is not a
    prompt-learning method or LLaMA-Adapter.

    Example:
        >>> import jpeft
        >>> from jpeft.models import llama
        >>> cfg = LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32,
        ...                   num_hidden_layers=2, num_attention_heads=2)
        >>> params = llama.init_params(jax.random.key(0), cfg)
        >>> method = jpeft.PromptTuning(num_virtual_tokens=4)
        >>> params = add_adapter(jax.random.key(1), params, cfg, method, "a")
        >>> params = add_adapter(jax.random.key(2), params, cfg, method, "b")
        >>> params["prompt"].names, params["prompt"].active_name
        (('a', 'b'), 'b')
    """
    base = _base(params)
    return _install(params, base, method.init(key, base, cfg), name, "add_adapter")


def load_adapter(
    adapter_dir: str | os.PathLike,
    params: Params,
    cfg: LlamaConfig,
    name: str,
    allow_nonfinite: bool = False,
) -> tuple[Method, Params]:
    """Load a peft prompt-learning or adaption-prompt directory as adapter ``name`` (active).

    peft's ``model.load_adapter(adapter_dir, adapter_name=name)``; errors as
    :func:`jpeft.load_hf_adapter`.

    Example (a full round trip is :func:`save_adapter`'s):
        >>> load_adapter("no/such/adapter", {}, None, "a")
        Traceback (most recent call last):
        FileNotFoundError: ...
    """
    base = _base(params)
    method, loaded = load_hf_adapter(adapter_dir, base, cfg, allow_nonfinite)
    return method, _install(params, base, loaded, name, f"load_adapter({os.fspath(adapter_dir)})")


def _named_entries(params: Params, name: str) -> dict[str, NamedAdapters]:
    held = {k: v for k, v in _entries(params).items() if isinstance(v, NamedAdapters)}
    found = {k: v for k, v in held.items() if name in v.names}
    if not found:
        names = sorted({n for v in held.values() for n in v.names})
        raise ValueError(f"no adapter named {name!r}; params hold {names}")
    return found


def set_adapter(params: Params, name: str) -> Params:
    """Make adapter ``name`` the active one (used by default, trainable); freeze the others.

    Example:
        >>> from jpeft.prompts.nodes import SoftPrompt
        >>> one = NamedAdapters((SoftPrompt(jnp.ones((2, 4))),), ("a",))
        >>> params = {"prompt": one.added(SoftPrompt(jnp.zeros((2, 4))), "b")}
        >>> set_adapter(params, "a")["prompt"].active_name
        'a'
    """
    return {**params, **{k: v.activated(name) for k, v in _named_entries(params, name).items()}}


def save_adapter(
    out_dir: str | os.PathLike, method: Method, params: Params, cfg: LlamaConfig, name: str
) -> None:
    """Write adapter ``name`` (made with ``method``) as a peft adapter directory.

    peft's ``model.save_pretrained(out_dir, selected_adapters=[name])`` for one adapter
    (peft puts a non-default one in a sub-directory ``name``; here ``out_dir`` is it).

    Example:
        >>> import jpeft, tempfile
        >>> from jpeft.models import llama
        >>> cfg = LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32,
        ...                   num_hidden_layers=2, num_attention_heads=2)
        >>> params = llama.init_params(jax.random.key(0), cfg)
        >>> method = jpeft.PrefixTuning(num_virtual_tokens=4)
        >>> held = add_adapter(jax.random.key(1), params, cfg, method, "a")
        >>> out = tempfile.mkdtemp()
        >>> save_adapter(out, method, held, cfg, "a")
        >>> _, loaded = load_adapter(out, held, cfg, "b")
        >>> loaded["prefix"].names
        ('a', 'b')
    """
    chosen = {k: v.adapter(name) for k, v in _named_entries(params, name).items()}
    save_hf_adapter(out_dir, method, {**params, **chosen}, cfg)


def adapter_ids(params: Params, names: Sequence[str]) -> jax.Array:
    """Per-row indices for ``ctx.adapter_ids`` from adapter names (``"__base__"``: -1).

    Every named entry of ``params`` must hold the same names in the same order.

    Example:
        >>> from jpeft.prompts.nodes import SoftPrompt
        >>> one = NamedAdapters((SoftPrompt(jnp.ones((2, 4))),), ("a",))
        >>> params = {"prompt": one.added(SoftPrompt(jnp.zeros((2, 4))), "b")}
        >>> ids = adapter_ids(params, ["b", "a"])
        >>> ids.tolist()
        [1, 0]
        >>> params["prompt"].prompt_embeddings(2, Context(adapter_ids=ids))[:, 0, 0].tolist()
        [0.0, 1.0]
    """
    orders = {v.names for v in _entries(params).values() if isinstance(v, NamedAdapters)}
    if len(orders) != 1:
        raise ValueError(f"adapter_ids: expected one list of adapter names, found {sorted(orders)}")
    (known,) = orders
    unknown = sorted({n for n in names if n != BASE and n not in known})
    if unknown:
        raise ValueError(f"unknown adapters {unknown}; params hold {list(known)} and {BASE!r}")
    return jnp.array([-1 if n == BASE else known.index(n) for n in names], jnp.int32)
