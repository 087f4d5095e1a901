"""``jpeft.LoRA``: the LoRA / rsLoRA / DoRA method (HF peft's ``LoraConfig``)."""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Mapping
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np

from jpeft.adapter_files import AdapterConfig, AdapterTensors, read_adapter_dir
from jpeft.lora import peft_io, trainable
from jpeft.lora.multi import BASE, adapter_names, add_adapter, set_adapter
from jpeft.lora.node import LoRAAdapter, LoRAWeight
from jpeft.lora.targets import ALL_LINEAR, ModulePlan, live_patterns, resolve
from jpeft.method import Method, register
from jpeft.models.config import LlamaConfig
from jpeft.models.linear import dense
from jpeft.models.param_spec import weight_path
from jpeft.models.pytree import Params, get_path, replace_paths
from jpeft.nodes import layer_mask

INITS = ("default", "gaussian")


@register
@dataclasses.dataclass(frozen=True)
class LoRA(Method):
    """Low-rank adapters on the projections: ``y = x W + (alpha / r) * dropout(x) A B``.

    Args:
        r: rank. alpha: ``lora_alpha``; scaling is ``alpha / r`` (``alpha / sqrt(r)``
            with ``use_rslora``).
        dropout: rate on the adapter's input branch (training only).
        targets: HF module names (``"q_proj"``...; suffixes or full names as in peft),
            ``"all-linear"``, or a regex matched against full module names.
        layers_to_transform: layer indices to adapt (default all).
        rank_pattern / alpha_pattern: per-module overrides keyed by module name or a
            regex on the end of the full name (``"v_proj"``, ``r"layers\\.0\\..*"``).
        init_weights: ``"default"`` (A kaiming-uniform, i.e. U(-1/sqrt(in), 1/sqrt(in)); B 0) or
            ``"gaussian"`` (A normal with std 1/r; B 0). Either way the model starts
            equal to its base.
        use_dora: weight-decomposed LoRA (a trainable magnitude per output).
        modules_to_save: ``"embed_tokens"`` / ``"lm_head"`` to train in full (peft's
            option; a :class:`jpeft.Trained` copy, see :mod:`jpeft.lora.trainable`).
        trainable_token_indices: token ids whose ``embed_tokens`` rows train (peft's
            ``TrainableTokens``; the rows are tied to a tied ``lm_head``).
        lora_bias: peft's ``lora_bias``: a trainable bias on ``B`` (zeros at init), scaled
            with it; merging adds ``scaling * bias`` to the layer's bias (layers without
            one cannot merge). Not with DoRA (as peft).
        adapter_name: the adapter's name; ``init`` on params that already hold
            adapters adds this one and makes it the active one.

    Example:
        >>> method = LoRA(r=16, alpha=32, dropout=0.05, targets=("q_proj", "v_proj"))
        >>> import jpeft
        >>> from jpeft.models import hf, llama
        >>> cfg, base = hf.load_pretrained("assets/tiny-llama")
        >>> params = method.init(jax.random.key(0), base, cfg)
        >>> trainable, frozen = jpeft.split(params)
        >>> trainable["layers"]["self_attn"]["q_proj"]["kernel"].adapters[0].a.shape  # [L, in, r]
        (4, 128, 16)
    """

    peft_type: ClassVar[str] = "LORA"

    r: int = 8
    alpha: float = 8
    dropout: float = 0.0
    targets: str | tuple[str, ...] = ("q_proj", "v_proj")
    layers_to_transform: tuple[int, ...] | None = None
    rank_pattern: Mapping[str, int] = dataclasses.field(default_factory=dict)
    alpha_pattern: Mapping[str, float] = dataclasses.field(default_factory=dict)
    use_rslora: bool = False
    init_weights: str = "default"
    use_dora: bool = False
    adapter_name: str = "default"
    modules_to_save: tuple[str, ...] = ()
    trainable_token_indices: tuple[int, ...] = ()
    lora_bias: bool = False

    def __post_init__(self) -> None:
        targets = self.targets
        if isinstance(targets, str):
            targets = ALL_LINEAR if targets.lower() == ALL_LINEAR else targets
        else:
            targets = tuple(targets)
            if not targets or not all(isinstance(t, str) for t in targets):
                raise ValueError(f"LoRA: targets must be module names, got {self.targets!r}")
        if isinstance(targets, str) and targets != ALL_LINEAR and self.layers_to_transform:
            raise ValueError("LoRA: layers_to_transform needs targets given as names, not a regex")
        layers = self.layers_to_transform
        layers = (layers,) if isinstance(layers, int) else layers
        object.__setattr__(self, "targets", targets)
        modules = trainable.trained_modules(self.modules_to_save, "LoRA")
        object.__setattr__(self, "modules_to_save", modules)
        tokens = trainable.token_indices(self.trainable_token_indices, "LoRA")
        object.__setattr__(self, "trainable_token_indices", tokens)
        object.__setattr__(self, "layers_to_transform", None if layers is None else tuple(layers))
        if not (isinstance(self.r, int) and self.r > 0):
            raise ValueError(f"LoRA: r must be a positive int, got {self.r!r}")
        bad_ranks = {k: v for k, v in self.rank_pattern.items() if not (int(v) == v and v > 0)}
        if bad_ranks:
            raise ValueError(f"LoRA: rank_pattern ranks must be positive ints, got {bad_ranks}")
        alphas = [self.alpha, *self.alpha_pattern.values()]
        if not all(math.isfinite(a) and a != 0 for a in alphas):
            raise ValueError(f"LoRA: alpha values must be finite and nonzero, got {alphas}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"LoRA: dropout must be in [0, 1), got {self.dropout}")
        if self.init_weights not in INITS:
            raise ValueError(f"LoRA: init_weights {self.init_weights!r}; valid: {list(INITS)}")
        if self.lora_bias and self.use_dora:
            raise ValueError(
                "LoRA: lora_bias=True is not supported with DoRA (peft refuses it too)"
            )
        if not self.adapter_name or self.adapter_name == BASE:
            raise ValueError(f"LoRA: adapter_name {self.adapter_name!r} is reserved or empty")

    def plans(self, cfg: LlamaConfig) -> dict[str, ModulePlan]:
        """Per targeted projection: the rank and alpha of each layer (see :mod:`.targets`).

        With ``cfg.tie_word_embeddings`` the ``lm_head`` plan is ``tied_lm_head``.
        """
        plans = resolve(
            self.targets,
            self.layers_to_transform,
            self.r,
            self.alpha,
            self.rank_pattern,
            self.alpha_pattern,
            cfg.num_hidden_layers,
        )
        if cfg.tie_word_embeddings and "lm_head" in plans:
            plans["lm_head"] = dataclasses.replace(plans["lm_head"], tied_lm_head=True)
        return plans

    def init(self, key: jax.Array, params: Params, cfg: LlamaConfig) -> Params:
        """Wrap each targeted kernel in a :class:`LoRAWeight` (or add to one already there)."""
        return self._add(params, cfg, key)

    def _add(self, params: Params, cfg: LlamaConfig, key: jax.Array | None) -> Params:
        """Add this adapter, ``a`` drawn from ``key`` (zeros when None, for loading)."""
        names = adapter_names(params)
        if self.adapter_name in names:
            raise ValueError(f"LoRA: params already hold an adapter named {self.adapter_name!r}")
        plans = self.plans(cfg)
        table = weight_path("embed_tokens")
        on_table = sorted(m for m, plan in plans.items() if plan.path == table)
        if (self.use_dora or self.lora_bias) and on_table:
            raise ValueError(
                f"LoRA: use_dora and lora_bias on {on_table} (the embedding table) are not "
                "supported; target linears"
            )
        modules, tokens = self.modules_to_save, self.trainable_token_indices
        trainable.check(modules, tokens, cfg)
        clash = sorted(set(on_table if tokens else ()) | set(plans) & set(modules))
        if clash:
            raise ValueError(
                f"LoRA: {clash} are both LoRA targets and trained apart (modules_to_save, or "
                "trainable_token_indices on the embedding table a tied lm_head shares)"
            )
        bases = {}
        for m, plan in plans.items():
            kernel = get_path(params, plan.path)
            bases[m] = kernel.base if isinstance(kernel, LoRAWeight) else kernel
        shapes = {m: jax.eval_shape(dense, base).shape for m, base in bases.items()}
        # a tied lm_head's adapter acts as a linear [hidden, vocab] on the [vocab, hidden] table
        shapes = {m: s[::-1] if plans[m].tied_lm_head else s for m, s in shapes.items()}
        for module, shape in shapes.items():
            stacked = plans[module].per_layer
            if len(shape) != 2 + stacked or (stacked and shape[0] != cfg.num_hidden_layers):
                expected = "[L, in, out]" if stacked else "[in, out]"
                raise ValueError(f"LoRA: {module} weight has shape {shape}, not {expected}")
        # what is drawn: a ``[..., in, r]``, or for the embedding (peft: A zero) b ``[r, out]``
        widths = [
            (plan.max_rank, shapes[m][-1])
            if m == "embed_tokens"
            else (*shapes[m][:-1], plan.max_rank)
            for m, plan in plans.items()
        ]
        normal = [self.init_weights == "gaussian" or m == "embed_tokens" for m in plans]
        noises = self._noise(key, widths, normal)
        for (module, plan), noise in zip(plans.items(), noises, strict=True):
            adapter = self._adapter(plan, noise, bases[module], shapes[module][-1], len(names))
            added = add_adapter(get_path(params, plan.path), adapter)
            params = replace_paths(params, {plan.path: added})  # one at a time: a tied
            # lm_head's adapter joins the embedding's on the shared table
        params = trainable.add(params, modules, tokens)
        return set_adapter(params, self.adapter_name)

    def _noise(
        self, key: jax.Array | None, shapes: list[tuple[int, ...]], normal: list[bool]
    ) -> list[jax.Array]:
        """Standard normal (where ``normal``) or uniform(-1, 1) arrays of ``shapes``.

        Zeros without a key. One uniform and one normal draw cover every module, so a
        single random kernel of each kind compiles per call.
        """
        if key is None:
            return [jnp.zeros(shape, jnp.float32) for shape in shapes]
        sizes = [math.prod(shape) for shape in shapes]
        flat = {
            False: jax.random.uniform(key, (sum(sizes),), jnp.float32, -1.0, 1.0),
            True: jax.random.normal(key, (sum(sizes),), jnp.float32),
        }
        starts = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(int)
        return [
            flat[n][start : start + size].reshape(shape)
            for n, start, size, shape in zip(normal, starts, sizes, shapes, strict=True)
        ]

    def _adapter(
        self, plan: ModulePlan, noise: jax.Array, base: Any, fan_out: int, index: int
    ) -> LoRAAdapter:
        """The adapter for one module from standard uniform(-1, 1) / normal ``noise``.

        ``embed_tokens`` follows peft's ``Embedding``: ``a`` (``lora_embedding_A``) zero
        and ``b`` standard normal (``noise`` is then ``b``).
        """
        ranks = np.asarray(plan.ranks)
        if plan.module == "embed_tokens":
            a = jnp.zeros((jax.eval_shape(dense, base).shape[0], plan.max_rank), jnp.float32)
            return self._node(plan, a, noise, None, index)
        if self.init_weights == "default":  # kaiming_uniform(a=sqrt(5)): U(+-1/sqrt(in))
            scale = np.full((len(ranks), 1, 1), 1.0 / math.sqrt(noise.shape[-2]))
        else:  # normal with std 1/r
            scale = (1.0 / np.maximum(ranks, 1))[:, None, None]
        columns = np.arange(plan.max_rank)[None, None, :] < ranks[:, None, None]
        mult = (scale * columns).astype(np.float32)
        magnitude = None
        if self.use_dora:  # ||W + s B A|| with B = 0; 0 in untouched layers (never read)
            norm = jnp.linalg.norm(dense(base).astype(jnp.float32), axis=-2)
            magnitude = norm * (ranks > 0)[:, None] if plan.per_layer else norm
        b = jnp.zeros((*noise.shape[:-2], plan.max_rank, fan_out), jnp.float32)
        a = noise * (mult if plan.per_layer else mult[0])
        return self._node(plan, a, b, magnitude, index)

    def _node(
        self, plan: ModulePlan, a: jax.Array, b: jax.Array, magnitude: Any, index: int
    ) -> LoRAAdapter:
        scaling = plan.scaling(self.use_rslora)
        return LoRAAdapter(
            a=a,
            b=b,
            scaling=jnp.asarray(scaling if plan.per_layer else scaling[0]),
            magnitude=magnitude,
            name=self.adapter_name,
            index=index,
            dropout=self.dropout,
            layer_mask=layer_mask(plan.layers, len(plan.ranks), "LoRA") if plan.per_layer else None,
            bias=jnp.zeros((*b.shape[:-2], b.shape[-1]), jnp.float32) if self.lora_bias else None,
            tied_lm_head=plan.tied_lm_head,
        )

    def adapter_config(self, cfg: LlamaConfig) -> dict[str, Any]:
        return peft_io.peft_config(self)

    def adapter_tensors(self, params: Params, cfg: LlamaConfig) -> dict[str, np.ndarray]:
        return peft_io.tensors(self, params, self.plans(cfg))

    @classmethod
    def read_adapter(
        cls,
        config: AdapterConfig,
        tensors: AdapterTensors,
        params: Params,
        cfg: LlamaConfig,
        adapter_name: str = "default",
    ) -> tuple[LoRA, Params]:
        options = live_patterns(peft_io.options(config), cfg.num_hidden_layers, config.source)
        method = cls(**options, adapter_name=adapter_name)
        params = method._add(params, cfg, key=None)
        return method, peft_io.fill(method, params, tensors, method.plans(cfg))


def load_adapter(
    adapter_dir: str | os.PathLike,
    params: Params,
    cfg: LlamaConfig,
    adapter_name: str,
    allow_nonfinite: bool = False,
) -> tuple[LoRA, Params]:
    """Load a peft LoRA adapter directory as adapter ``adapter_name`` (added and made active).

    ``jpeft.load_hf_adapter`` always names the adapter ``"default"``; use this to hold
    several adapters in one params tree. Tensors holding NaN/Inf are refused unless
    ``allow_nonfinite``.

    Example:
        >>> import tempfile, jpeft
        >>> from jpeft.models import hf, llama
        >>> cfg, base = hf.load_pretrained("assets/tiny-llama")
        >>> dirs = {name: tempfile.mkdtemp() for name in "ab"}
        >>> for seed, (name, path) in enumerate(dirs.items()):
        ...     trained = LoRA(r=2).init(jax.random.key(seed), base, cfg)
        ...     jpeft.save_hf_adapter(path, LoRA(r=2), trained, cfg)
        >>> _, params = load_adapter(dirs["a"], base, cfg, "a")
        >>> _, params = load_adapter(dirs["b"], params, cfg, "b")
        >>> params["layers"]["self_attn"]["q_proj"]["kernel"].names
        ('a', 'b')
    """
    config, tensors = read_adapter_dir(adapter_dir, allow_nonfinite)
    peft_type = config.require("peft_type", str)
    if peft_type != LoRA.peft_type:
        raise ValueError(f"{config.source}: peft_type {peft_type!r} is not 'LORA'")
    return LoRA.from_adapter(config, tensors, params, cfg, adapter_name=adapter_name)
