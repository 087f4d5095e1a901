"""Where each tensor of our params tree lives in an HF ``LlamaForCausalLM`` state dict."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import jax
import numpy as np

from models.config import LlamaConfig
from models.linear import dense

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

    PEFT nodes at tensor slots are folded with :func:`models.linear.dense` (merge
    first to be explicit); entries a plain LLaMA has no place for (adapters,
    prompts, prefixes) raise ``ValueError``: they cannot be merged.
    """
    _check_mergeable(params)
    out = {}
    for key, path, layer, transposed in tensor_slots(cfg):
        node: Any = params
        for part in path:
            node = node[part]
        array = np.asarray(jax.device_get(dense(node) if layer is None else dense(node)[layer]))
        out[key] = np.ascontiguousarray(array.T if transposed else array)
    return out


_BASE_ENTRIES = {
    "embed_tokens": None,
    "norm": None,
    "lm_head": None,
    "layers": {"input_layernorm", "post_attention_layernorm", "self_attn", "mlp"},
}


def _check_mergeable(params: dict[str, Any]) -> None:
    extra = [k for k in params if k not in _BASE_ENTRIES]
    extra += [f"layers/{k}" for k in params.get("layers", {}) if k not in _BASE_ENTRIES["layers"]]
    if extra:
        kinds = {k: type(_get(params, k)).__name__ for k in extra}
        raise ValueError(
            f"cannot write a plain LLaMA checkpoint: {kinds} have no place in it "
            "(they add computation that cannot be folded into the base weights)"
        )


def _get(params: dict[str, Any], path: str) -> Any:
    node: Any = params
    for part in path.split("/"):
        node = node[part]
    return node
