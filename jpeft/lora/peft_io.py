"""LoRA in HF peft's adapter files: config keys and tensor names, both ways.

On disk (adapter name stripped, torch layout), for each transformed layer ``i``::

    base_model.model.model.layers.{i}.{self_attn|mlp}.{name}.lora_A.weight   [r_i, in]
    base_model.model.model.layers.{i}.{self_attn|mlp}.{name}.lora_B.weight   [out, r_i]
    base_model.model.model.layers.{i}.{self_attn|mlp}.{name}.lora_magnitude_vector  [out]
    base_model.model.model.layers.{i}.{self_attn|mlp}.{name}.lora_B.bias     [out]

(the magnitude for DoRA, the bias with ``lora_bias=True``). Untouched layers have no
tensors; ``r_i`` is the layer's own rank (our arrays are zero-padded to the module's
largest rank). Outside the layers::

    base_model.model.lm_head.lora_A.weight                   [r, hidden]
    base_model.model.lm_head.lora_B.weight                   [vocab, r]
    base_model.model.model.embed_tokens.lora_embedding_A     [r, vocab]
    base_model.model.model.embed_tokens.lora_embedding_B     [hidden, r]
    base_model.model.{lm_head|model.embed_tokens}.base_layer.weight   [vocab, hidden]

peft saves the adapted module's base weight with it (``save_embedding_layers``), and
loading puts it in place of the model's; so do we. On a model with tied embeddings the
``lm_head`` keys are the same, its ``base_layer.weight`` being the shared table (see
:mod:`jpeft.lora.node` for where its adapter sits). ``modules_to_save`` and trainable
tokens are :mod:`jpeft.lora.trainable`'s.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import jax.numpy as jnp
import numpy as np

from jpeft.adapter_files import (
    NUMBER,
    PEFT_PREFIX,
    SEQUENCE,
    AdapterConfig,
    AdapterTensors,
    peft_module,
)
from jpeft.lora import trainable
from jpeft.lora.node import LoRAWeight
from jpeft.lora.targets import ALL_LINEAR, ModulePlan
from jpeft.models.linear import dense
from jpeft.models.param_spec import PROJECTIONS, top_module
from jpeft.models.pytree import Params, get_path, replace_paths

if TYPE_CHECKING:
    from jpeft.lora.method import LoRA


# peft config keys whose non-default values change the model in ways jpeft's LoRA
# does not implement; loading such an adapter is an error, not a silent mismatch.
_UNSUPPORTED = (
    "alora_invocation_tokens",
    "arrow_config",
    "exclude_modules",
    "fan_in_fan_out",
    "kasa_config",
    "layer_replication",
    "ensure_weight_tying",
    "monteclora_config",
    "target_parameters",
    "use_bdlora",
    "use_qalora",
    "velora_config",
)
_INITS = {True: "default", False: "default", "gaussian": "gaussian"}


def _lora_weight(params: Params, plan: ModulePlan) -> LoRAWeight:
    """The :class:`LoRAWeight` at ``plan``'s weight (``ValueError`` if there is none)."""
    kernel = get_path(params, plan.path)
    if not isinstance(kernel, LoRAWeight):
        raise ValueError(f"LoRA: {'/'.join(plan.path)} holds no LoRA node")
    return kernel


def _sites(plan: ModulePlan) -> Iterator[tuple[int | None, str, int]]:
    """``(layer, peft key, rank)`` of each adapted instance (layer None outside the layers)."""
    if not plan.per_layer:
        yield None, PEFT_PREFIX + top_module(plan.module).hf_module, plan.ranks[0]
        return
    for i in plan.layers:
        yield i, peft_module(i, plan.module), plan.ranks[i]


def _names(module: str, key: str) -> tuple[str, str]:
    """The peft names of the ``a`` and ``b`` tensors of ``module`` at ``key``."""
    if module == "embed_tokens":
        return f"{key}.lora_embedding_A", f"{key}.lora_embedding_B"
    return f"{key}.lora_A.weight", f"{key}.lora_B.weight"


def peft_config(method: LoRA) -> dict[str, Any]:
    """The ``adapter_config.json`` entries peft's ``LoraConfig`` reads.

    Example:
        >>> from jpeft.lora import LoRA
        >>> peft_config(LoRA(targets="all-linear"))["target_modules"][:2]
        ['down_proj', 'gate_proj']
    """
    targets = method.targets
    if targets == ALL_LINEAR:
        targets = PROJECTIONS
    return {
        "peft_type": "LORA",
        "r": method.r,
        "lora_alpha": method.alpha,
        "lora_dropout": method.dropout,
        "target_modules": targets if isinstance(targets, str) else sorted(targets),
        "layers_to_transform": _listed(method.layers_to_transform),
        "layers_pattern": None,
        "rank_pattern": dict(method.rank_pattern),
        "alpha_pattern": dict(method.alpha_pattern),
        "use_rslora": method.use_rslora,
        "use_dora": method.use_dora,
        "lora_bias": method.lora_bias,
        "init_lora_weights": True if method.init_weights == "default" else method.init_weights,
        "bias": "none",
        "fan_in_fan_out": False,
        "modules_to_save": list(method.modules_to_save) or None,
        "trainable_token_indices": list(method.trainable_token_indices) or None,
    }


def options(config: AdapterConfig | dict[str, Any]) -> dict[str, Any]:
    """``jpeft.LoRA`` keyword arguments from a peft ``adapter_config.json`` (checked types).

    Example:
        >>> options({"r": 4, "lora_alpha": 8, "target_modules": ["v_proj", "q_proj"]})["targets"]
        ('q_proj', 'v_proj')
    """
    config = AdapterConfig.of(config)
    bad = {k: config.values[k] for k in _UNSUPPORTED if config.get(k) not in (None, False, [], {})}
    if config.get("bias", str, "none") != "none":
        bad["bias"] = config.values["bias"]
    if config.get("layers_pattern") not in (None, "", "layers", ["layers"]):
        bad["layers_pattern"] = config.values["layers_pattern"]
    init = config.get("init_lora_weights", (bool, str), True)
    if init not in _INITS:
        bad["init_lora_weights"] = init
    if bad:
        raise ValueError(f"{config.source}: unsupported peft LoRA settings {bad}")
    targets = config.get("target_modules", (str, *SEQUENCE), items=str)
    if not targets:
        raise ValueError(f"{config.source}: no target_modules")
    layers = config.get("layers_to_transform", (int, *SEQUENCE), items=int)
    return {
        "r": config.get("r", int, 8),
        "alpha": config.get("lora_alpha", NUMBER, 8),
        "dropout": float(config.get("lora_dropout", NUMBER, 0.0)),
        "targets": targets if isinstance(targets, str) else tuple(sorted(targets)),
        "layers_to_transform": (layers,) if isinstance(layers, int) else _tupled(layers),
        "rank_pattern": dict(config.get("rank_pattern", dict, {}, items=int)),
        "alpha_pattern": dict(config.get("alpha_pattern", dict, {}, items=NUMBER)),
        "use_rslora": config.get("use_rslora", bool, False),
        "use_dora": config.get("use_dora", bool, False),
        "lora_bias": config.get("lora_bias", bool, False),
        "init_weights": _INITS[init],
        **trainable.options(config),
    }


def tensors(method: LoRA, params: Params, plans: dict[str, ModulePlan]) -> dict[str, np.ndarray]:
    """Adapter ``method.adapter_name``'s tensors under peft's names, for the layers it touches.

    Example:
        >>> import jax, jpeft
        >>> from jpeft.models import hf, llama
        >>> cfg, base = hf.load_pretrained("assets/tiny-llama")
        >>> method = jpeft.LoRA(r=2)
        >>> params = method.init(jax.random.key(0), base, cfg)
        >>> sorted(tensors(method, params, method.plans(cfg)))[0]
        'base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight'
    """
    out = {}
    for module, plan in plans.items():
        weight = _lora_weight(params, plan)
        ad = weight.adapter(method.adapter_name, plan.tied_lm_head)
        a, b = np.asarray(ad.a), np.asarray(ad.b)
        for i, key, rank in _sites(plan):
            a_i, b_i = (a, b) if i is None else (a[i], b[i])
            name_a, name_b = _names(module, key)
            out[name_a], out[name_b] = a_i[:, :rank].T, b_i[:rank, :].T
            if ad.magnitude is not None:
                magnitude = np.asarray(ad.magnitude)
                out[f"{key}.lora_magnitude_vector"] = magnitude if i is None else magnitude[i]
            if ad.bias is not None:
                bias = np.asarray(ad.bias)
                out[f"{key}.lora_B.bias"] = bias if i is None else bias[i]
            if i is None:
                base = np.asarray(dense(weight.base))
                out[f"{key}.base_layer.weight"] = base.T if _transposed(plan) else base
    modules, tokens = method.modules_to_save, method.trainable_token_indices
    return {**out, **trainable.tensors(params, modules, tokens)}


def fill(
    method: LoRA, params: Params, found: AdapterTensors, plans: dict[str, ModulePlan]
) -> Params:
    """``params`` (already holding ``method``'s adapter) with its arrays taken from ``found``.

    Raises ``ValueError`` for a missing or misshapen tensor.

    Example:
        >>> import jax, jpeft
        >>> from jpeft.models import hf, llama
        >>> cfg, base = hf.load_pretrained("assets/tiny-llama")
        >>> from jpeft.adapter_files import AdapterTensors
        >>> method = jpeft.LoRA(r=2)
        >>> params = method.init(jax.random.key(0), base, cfg)
        >>> found = AdapterTensors(tensors(method, params, method.plans(cfg)))
        >>> fresh = method.init(jax.random.key(1), base, cfg)
        >>> filled = fill(method, fresh, found, method.plans(cfg))
        >>> q = lambda p: p["layers"]["self_attn"]["q_proj"]["kernel"].adapters[0].a
        >>> bool(jnp.all(q(filled) == q(params)))
        True
    """
    for module, plan in plans.items():
        weight = _lora_weight(params, plan)
        ad = weight.adapter(method.adapter_name, plan.tied_lm_head)
        a, b = np.array(ad.a), np.array(ad.b)
        magnitude = None if ad.magnitude is None else np.array(ad.magnitude)
        bias = None if ad.bias is None else np.array(ad.bias)
        fan_in, fan_out = a.shape[-2], b.shape[-1]
        base = weight.base
        for i, key, r in _sites(plan):
            a_i, b_i = (a, b) if i is None else (a[i], b[i])
            name_a, name_b = _names(module, key)
            a_i[:, :r] = found.take(name_a, (r, fan_in)).T
            b_i[:r, :] = found.take(name_b, (fan_out, r)).T
            if magnitude is not None:
                m_i = magnitude if i is None else magnitude[i]
                m_i[...] = found.take(f"{key}.lora_magnitude_vector", (fan_out,))
            if bias is not None:
                bias_i = bias if i is None else bias[i]
                bias_i[...] = found.take(f"{key}.lora_B.bias", (fan_out,))
            if i is None and f"{key}.base_layer.weight" in found.tensors:
                base = _base_from_file(found, f"{key}.base_layer.weight", plan, base)
        new = dataclasses.replace(
            ad,
            a=jnp.asarray(a),
            b=jnp.asarray(b),
            magnitude=None if magnitude is None else jnp.asarray(magnitude),
            bias=None if bias is None else jnp.asarray(bias),
        )
        adapters = tuple(new if x is ad else x for x in weight.adapters)
        # one module at a time: a tied lm_head's adapter shares its node with the embedding's
        params = replace_paths(params, {plan.path: LoRAWeight(base, adapters)})
    modules, tokens = method.modules_to_save, method.trainable_token_indices
    return trainable.fill(params, found, modules, tokens)


def _transposed(plan: ModulePlan) -> bool:
    """True where the weight at ``plan.path`` is stored transposed from torch's layout."""
    return top_module(plan.module).transposed and not plan.tied_lm_head


def _base_from_file(found: AdapterTensors, name: str, plan: ModulePlan, base: Any) -> Any:
    """The saved base weight of an adapted embedding or ``lm_head`` (peft loads it in place)."""
    current = np.asarray(dense(base))
    shape = current.shape[::-1] if _transposed(plan) else current.shape
    value = found.take(name, shape)
    return jnp.asarray(value.T if _transposed(plan) else value, current.dtype)


def _listed(layers: tuple[int, ...] | None) -> list[int] | None:
    return None if layers is None else list(layers)


def _tupled(layers: list[int] | None) -> tuple[int, ...] | None:
    return None if layers is None else tuple(int(i) for i in layers)
