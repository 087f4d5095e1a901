"""Where each tensor of our params tree lives in an HF ``LlamaForCausalLM`` state dict."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import jax
import numpy as np

from jpeft.models.config import LlamaConfig
from jpeft.models.linear import dense

ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP = ("gate_proj", "up_proj", "down_proj")
PROJECTIONS = ATTENTION + MLP


def group_of(module: str) -> str:
    """``"self_attn"`` or ``"mlp"``: the params group that holds an HF projection name."""
    if module in ATTENTION:
        return "self_attn"
    if module in MLP:
        return "mlp"
    raise ValueError(f"{module!r} is not a LLaMA projection; valid: {list(PROJECTIONS)}")


def hf_key(layer: int, module: str, leaf: str = "weight") -> str:
    """``model.layers.{layer}.{self_attn|mlp}.{module}.{leaf}``."""
    return f"model.layers.{layer}.{group_of(module)}.{module}.{leaf}"


def tensor_slots(cfg: LlamaConfig) -> Iterator[tuple[str, tuple, int | None, bool]]:
    """Every HF tensor: ``(hf_key, params_path, layer_index or None, transposed)``.

    ``params_path`` is the key path into our params tree; ``transposed`` means the
    HF tensor is the transpose of ours (linear kernels).

    Example:
        >>> cfg = LlamaConfig(vocab_size=8, hidden_size=4, intermediate_size=8,
        ...                   num_hidden_layers=1, num_attention_heads=1)
        >>> next(tensor_slots(cfg))[0]
        'model.embed_tokens.weight'
    """
    yield "model.embed_tokens.weight", ("embed_tokens", "embedding"), None, False
    for i in range(cfg.num_hidden_layers):
        for norm in ("input_layernorm", "post_attention_layernorm"):
            yield f"model.layers.{i}.{norm}.weight", ("layers", norm, "scale"), i, False
        for module in PROJECTIONS:
            group = group_of(module)
            yield hf_key(i, module), ("layers", group, module, "kernel"), i, True
            bias = cfg.attention_bias if group == "self_attn" else cfg.mlp_bias
            if bias:
                yield hf_key(i, module, "bias"), ("layers", group, module, "bias"), i, False
    yield "model.norm.weight", ("norm", "scale"), None, False
    if not cfg.tie_word_embeddings:
        yield "lm_head.weight", ("lm_head", "kernel"), None, True


def hf_state_dict(params: dict[str, Any], cfg: LlamaConfig) -> dict[str, np.ndarray]:
    """Our (plain or merged) params as HF's LLaMA state dict of numpy arrays.

    PEFT nodes at tensor slots are folded with :func:`jpeft.models.linear.dense` (merge
    first to be explicit); entries a plain LLaMA has no place for (adapters,
    prompts, prefixes) raise ``ValueError``: they cannot be merged.
    """
    check_placed(params, cfg)
    out = {}
    for key, path, layer, transposed in tensor_slots(cfg):
        node: Any = params
        for part in path:
            node = node[part]
        array = np.asarray(jax.device_get(dense(node) if layer is None else dense(node)[layer]))
        out[key] = np.ascontiguousarray(array.T if transposed else array)
    return out


def check_placed(params: dict[str, Any], cfg: LlamaConfig) -> None:
    """Every params entry must be a tensor slot of ``cfg`` and every slot present."""
    slots = {path for _, path, _, _ in tensor_slots(cfg)}
    prefixes = {path[:i] for path in slots for i in range(len(path))}
    extra: list[str] = []

    def walk(node: Any, at: tuple) -> None:
        if at in slots:
            return
        if at in prefixes and isinstance(node, dict):
            for name, child in node.items():
                walk(child, (*at, name))
        else:
            extra.append(f"{'/'.join(at)} ({type(node).__name__})")

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
