"""Where each tensor of our params tree lives in an HF ``LlamaForCausalLM`` state dict.

The names and layouts come from :data:`jpeft.models.param_spec.LAYOUT`.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import jax
import numpy as np

from jpeft.models.config import LlamaConfig
from jpeft.models.linear import dense
from jpeft.models.param_spec import PROJECTIONS, group_of, module_name, specs
from jpeft.models.pytree import Params, get_path

__all__ = ["PROJECTIONS", "check_placed", "group_of", "hf_key", "hf_state_dict", "tensor_slots"]


def hf_key(layer: int, module: str, leaf: str = "weight") -> str:
    """``model.layers.{layer}.{self_attn|mlp}.{module}.{leaf}`` of a projection.

    Example:
        >>> hf_key(2, "q_proj", "bias")
        'model.layers.2.self_attn.q_proj.bias'
    """
    return f"{module_name(layer, module)}.{leaf}"


def tensor_slots(cfg: LlamaConfig) -> Iterator[tuple[str, tuple, int | None, bool]]:
    """Every HF tensor, in HF order: ``(hf_key, params_path, layer_index or None, transposed)``.

    ``params_path`` is the key path into our params tree; ``transposed`` means the
    HF tensor is the transpose of ours (linear kernels).

    Example:
        >>> cfg = LlamaConfig(vocab_size=8, hidden_size=4, intermediate_size=8,
        ...                   num_hidden_layers=1, num_attention_heads=1)
        >>> next(tensor_slots(cfg))[0]
        'model.embed_tokens.weight'
    """
    present = specs(cfg)
    per_layer = [spec for spec in present if spec.per_layer]
    for spec in present:
        if not spec.per_layer:
            yield spec.hf_key(), spec.path, None, spec.transposed
        elif spec is per_layer[0]:  # all layer leaves, layer by layer
            for i in range(cfg.num_hidden_layers):
                for leaf in per_layer:
                    yield leaf.hf_key(i), leaf.path, i, leaf.transposed


def hf_state_dict(params: Params, cfg: LlamaConfig) -> dict[str, np.ndarray]:
    """Our (plain or merged) params as HF's LLaMA state dict of numpy arrays.

    PEFT nodes at tensor slots are folded with :func:`jpeft.models.linear.dense` (merge
    first to be explicit); entries a plain LLaMA has no place for (adapters,
    prompts, prefixes) raise ``ValueError``: they cannot be merged.
    """
    check_placed(params, cfg)
    out = {}
    for key, path, layer, transposed in tensor_slots(cfg):
        weight = dense(get_path(params, path))
        array = np.asarray(jax.device_get(weight if layer is None else weight[layer]))
        out[key] = np.ascontiguousarray(array.T if transposed else array)
    return out


def check_placed(params: Params, cfg: LlamaConfig) -> None:
    """Every params entry must be a tensor slot of ``cfg`` and every slot present."""
    slots = {spec.path for spec in specs(cfg)}
    prefixes = {path[:i] for path in slots for i in range(len(path))}
    extra: list[str] = []

    def walk(entry: Any, at: tuple) -> None:
        if at in slots:
            return
        if at in prefixes and isinstance(entry, dict):
            for name, child in entry.items():
                walk(child, (*at, name))
        else:
            extra.append(f"{'/'.join(at)} ({type(entry).__name__})")

    walk(params, ())
    if extra:
        raise ValueError(
            f"cannot write a plain LLaMA checkpoint: {extra} have no place in it for this "
            "config (they add computation that cannot be folded into the base weights, or "
            "the config lacks the bias/lm_head they fill)"
        )
    missing = ["/".join(path) for path in slots if not _has(params, path)]
    if missing:
        raise ValueError(f"params lack {missing}, which the config requires")


def _has(tree: Any, path: tuple) -> bool:
    for part in path:
        if not isinstance(tree, dict) or part not in tree:
            return False
        tree = tree[part]
    return True
