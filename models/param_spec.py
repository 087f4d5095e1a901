"""One spec per parameter leaf of the LLaMA params tree: the single home of the base layout.

Each leaf has one :class:`ParamSpec`: its path in the params tree, its logical axes
(its shape follows from them, see :func:`axis_sizes`), its Hugging Face tensor name,
whether HF stores it transposed, and its initializer. Every leaf is a float array in
the params dtype (the ``dtype`` given to ``init_params`` or ``load_pretrained``).
Everything that knows the base layout derives it from :data:`LAYOUT`:

* :func:`jpeft.models.llama.init_params`: shapes, dtype and initial values;
* :func:`jpeft.models.hf_names.tensor_slots`: HF names and transposes for loading/saving;
* :func:`jpeft.sharding.logical_axes`: sharding, and through it the axes of each PEFT
  node placed at a leaf (LoRA ``a``/``b`` take the kernel's input/output axis, packed NF4
  follows the kernel);
* the layout table printed by :func:`describe` (the params-layout docs).

Logical axes: ``vocab``, ``embed`` (hidden size), ``heads`` (query heads x head_dim),
``kv_heads`` (key/value heads x head_dim), ``mlp`` (intermediate size), ``norm`` (norm
scales, hidden size) and ``layers`` (the stacked layer axis every entry under
``layers`` leads with, scanned by the forward pass).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from jpeft.models.config import LlamaConfig
from jpeft.models.pytree import Axes

LAYER_AXIS = "layers"
LAYER_PREFIX = "model.layers"
INIT_STD = 0.02  # HF LlamaConfig.initializer_range default

ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP = ("gate_proj", "up_proj", "down_proj")
PROJECTIONS = ATTENTION + MLP
NORMS = ("input_layernorm", "post_attention_layernorm")

_PROJECTION_AXES = {
    "q_proj": ("embed", "heads"),
    "k_proj": ("embed", "kv_heads"),
    "v_proj": ("embed", "kv_heads"),
    "o_proj": ("heads", "embed"),
    "gate_proj": ("embed", "mlp"),
    "up_proj": ("embed", "mlp"),
    "down_proj": ("mlp", "embed"),
}


def group_of(module: str) -> str:
    """``"self_attn"`` or ``"mlp"``: the params group that holds an HF projection name.

    Example:
        >>> group_of("up_proj")
        'mlp'
    """
    if module in ATTENTION:
        return "self_attn"
    if module in MLP:
        return "mlp"
    raise ValueError(f"{module!r} is not a LLaMA projection; valid: {list(PROJECTIONS)}")


def module_name(layer: int | str, module: str) -> str:
    """transformers' dotted name of a module inside decoder layer ``layer``.

    ``module`` is a projection name (its group is added), or a path inside the layer
    (``"self_attn"``, ``"input_layernorm"``, ``"adapter_mlp"``). The one place that
    builds ``model.layers.{i}...`` names: HF checkpoints, peft adapter keys and LoRA
    target matching all use it.

    Example:
        >>> module_name(1, "up_proj"), module_name(0, "self_attn")
        ('model.layers.1.mlp.up_proj', 'model.layers.0.self_attn')
    """
    path = f"{group_of(module)}.{module}" if module in PROJECTIONS else module
    return f"{LAYER_PREFIX}.{layer}.{path}"


@dataclasses.dataclass(frozen=True)
class ParamSpec:
    """One leaf of the base params tree.

    Attributes:
        path: keys into the params tree, e.g. ``("layers", "mlp", "up_proj", "kernel")``.
        axes: logical axis names, one per dimension (the shape follows, :func:`axis_sizes`).
        hf_module: the HF module holding the tensor; inside a layer, relative to it
            (``"self_attn.q_proj"``), else absolute (``"model.norm"``).
        hf_leaf: the HF tensor name in the module (``"weight"``, ``"bias"``).
        transposed: HF stores the transpose of ours (linear weights are ``[out, in]``;
            our kernels ``[in, out]``).
        init: ``"normal"`` (std :data:`INIT_STD`), ``"ones"`` or ``"zeros"``.
        needs: the config flag the leaf exists under (``"attention_bias"``,
            ``"not tie_word_embeddings"``...), None when always present.

    Example:
        >>> spec = spec_at(("layers", "self_attn", "q_proj", "kernel"))
        >>> spec.hf_key(3), spec.transposed
        ('model.layers.3.self_attn.q_proj.weight', True)
    """

    path: tuple[str, ...]
    axes: Axes
    hf_module: str
    hf_leaf: str
    transposed: bool
    init: str
    needs: str | None = None

    @property
    def per_layer(self) -> bool:
        """True for leaves stacked over layers (leading ``layers`` axis)."""
        return self.axes[0] == LAYER_AXIS

    def present(self, cfg: LlamaConfig) -> bool:
        """Whether a model of ``cfg`` has this leaf."""
        if self.needs is None:
            return True
        flag = self.needs.removeprefix("not ")
        return bool(getattr(cfg, flag)) != self.needs.startswith("not ")

    def shape(self, cfg: LlamaConfig) -> tuple[int, ...]:
        """Our (stacked) shape for ``cfg``."""
        sizes = axis_sizes(cfg)
        return tuple(sizes[axis] for axis in self.axes)

    def hf_key(self, layer: int | str | None = None) -> str:
        """The HF state-dict key (of layer ``layer`` for per-layer leaves)."""
        module = module_name(layer, self.hf_module) if self.per_layer else self.hf_module
        return f"{module}.{self.hf_leaf}"

    def initial(self, key: jax.Array | None, cfg: LlamaConfig, dtype: jnp.dtype) -> jax.Array:
        """The initial value (``key`` is used by ``"normal"`` leaves only)."""
        shape = self.shape(cfg)
        if self.init == "normal":
            return INIT_STD * jax.random.normal(key, shape, dtype)
        return (jnp.ones if self.init == "ones" else jnp.zeros)(shape, dtype)


def _projection(module: str) -> tuple[ParamSpec, ParamSpec]:
    group = group_of(module)
    axis_in, axis_out = _PROJECTION_AXES[module]
    path, hf = (LAYER_AXIS, group, module), f"{group}.{module}"
    flag = "attention_bias" if group == "self_attn" else "mlp_bias"
    return (
        ParamSpec((*path, "kernel"), (LAYER_AXIS, axis_in, axis_out), hf, "weight", True, "normal"),
        ParamSpec((*path, "bias"), (LAYER_AXIS, axis_out), hf, "bias", False, "zeros", flag),
    )


def _norm(name: str) -> ParamSpec:
    return ParamSpec(
        (LAYER_AXIS, name, "scale"), (LAYER_AXIS, "norm"), name, "weight", False, "ones"
    )


LAYOUT: tuple[ParamSpec, ...] = (
    ParamSpec(
        ("embed_tokens", "embedding"), ("vocab", "embed"), "model.embed_tokens", "weight", False,
        "normal",
    ),
    *map(_norm, NORMS),
    *(spec for module in PROJECTIONS for spec in _projection(module)),
    ParamSpec(("norm", "scale"), ("norm",), "model.norm", "weight", False, "ones"),
    ParamSpec(
        ("lm_head", "kernel"), ("embed", "vocab"), "lm_head", "weight", True, "normal",
        "not tie_word_embeddings",
    ),
)  # fmt: skip
"""Every leaf any config can have, in HF state-dict order (layer leaves repeat per layer)."""

_BY_PATH = {spec.path: spec for spec in LAYOUT}
TOP_MODULES = ("embed_tokens", "lm_head")
"""The modules outside the decoder layers that peft adapts (LoRA, ``modules_to_save``)."""
_TOP = {spec.hf_module.rpartition(".")[2]: spec for spec in LAYOUT if not spec.per_layer}
BASE_ENTRIES = frozenset(spec.path[0] for spec in LAYOUT)
"""Top-level keys of the base params tree; any other top-level entry is a PEFT method's."""
LAYER_ENTRIES = frozenset(spec.path[1] for spec in LAYOUT if spec.per_layer)
"""Keys under ``layers`` of the base tree; any other one is a PEFT method's per-layer node."""


def top_module(module: str) -> ParamSpec:
    """The spec of the weight of a module outside the layers (``"embed_tokens"``, ``"lm_head"``).

    Its ``path`` is where the weight sits in params, its ``hf_module`` the module's full
    transformers name. Raises ``ValueError`` for any other name.

    Example:
        >>> top_module("embed_tokens").hf_module, top_module("lm_head").path
        ('model.embed_tokens', ('lm_head', 'kernel'))
    """
    if module not in TOP_MODULES:
        raise ValueError(f"{module!r} is not one of {list(TOP_MODULES)}")
    return _TOP[module]


def weight_path(module: str) -> tuple[str, ...]:
    """Where the weight of ``module`` (a projection, ``embed_tokens`` or ``lm_head``) sits.

    Example:
        >>> weight_path("v_proj"), weight_path("embed_tokens")
        (('layers', 'self_attn', 'v_proj', 'kernel'), ('embed_tokens', 'embedding'))
    """
    if module in TOP_MODULES:
        return top_module(module).path
    return (LAYER_AXIS, group_of(module), module, "kernel")


def axis_sizes(cfg: LlamaConfig) -> dict[str, int]:
    """The size of each logical axis for ``cfg``.

    Example:
        >>> cfg = LlamaConfig(vocab_size=8, hidden_size=4, intermediate_size=6,
        ...                   num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1)
        >>> axis_sizes(cfg)["kv_heads"], spec_at(("lm_head", "kernel")).shape(cfg)
        (2, (4, 8))
    """
    return {
        "vocab": cfg.vocab_size,
        "embed": cfg.hidden_size,
        "norm": cfg.hidden_size,
        "heads": cfg.num_attention_heads * cfg.head_dim,
        "kv_heads": cfg.num_key_value_heads * cfg.head_dim,
        "mlp": cfg.intermediate_size,
        LAYER_AXIS: cfg.num_hidden_layers,
    }


def specs(cfg: LlamaConfig) -> tuple[ParamSpec, ...]:
    """The leaves a model of ``cfg`` has, in :data:`LAYOUT` order."""
    return tuple(spec for spec in LAYOUT if spec.present(cfg))


def spec_at(path: tuple[str, ...]) -> ParamSpec | None:
    """The spec of the leaf at ``path``, or None when ``path`` is not a base leaf.

    Example:
        >>> spec_at(("layers", "mlp", "down_proj", "kernel")).axes
        ('layers', 'mlp', 'embed')
    """
    return _BY_PATH.get(tuple(path))


def random_leaves() -> tuple[ParamSpec, ...]:
    """The ``"normal"`` leaves in the order they take keys from one ``jax.random.split``.

    Layer kernels first, then the rest; every config splits as many keys (a tied
    model simply leaves ``lm_head``'s unused), so a key gives the same weights with
    or without biases or tying.
    """
    drawn = [spec for spec in LAYOUT if spec.init == "normal"]
    return tuple(sorted(drawn, key=lambda spec: not spec.per_layer))


def describe() -> str:
    """The params layout as a table, one row per leaf: path, logical axes, HF tensor, layout.

    ``python -c "from jpeft.models.param_spec import describe; print(describe())"``
    prints the whole table.

    Example:
        >>> print(describe().splitlines()[3])
        layers/self_attn/q_proj/kernel        (layers, embed, heads)    model.layers.{i}.self_attn.q_proj.weight, transposed
        >>> print(describe().splitlines()[-1])
        lm_head/kernel                        (embed, vocab)            lm_head.weight, transposed, only if not tie_word_embeddings
    """  # noqa: E501
    rows = []
    for spec in LAYOUT:
        notes = [spec.hf_key("{i}")] + ["transposed"] * spec.transposed
        notes += [f"only if {spec.needs}"] if spec.needs else []
        axes = f"({', '.join(spec.axes)})"
        rows.append(f"{'/'.join(spec.path):<38}{axes:<26}{', '.join(notes)}")
    return "\n".join(rows)
