"""The parts of peft's prompt-learning adapter format all four methods share.

peft saves one tensor, ``prompt_embeddings`` (the encoder *output*), plus
``prefix_task_cols`` / ``prefix_task_rows`` for multitask prompts. Its
``adapter_config.json`` describes the model the adapter was made for
(``num_layers``, ``token_dim``, ``num_attention_heads``...); these helpers write
those keys and check them against a model when loading (tensors are read through
:class:`jpeft.adapter_files.AdapterTensors`).
"""

from __future__ import annotations

from typing import Any

from jpeft.adapter_files import AdapterConfig
from jpeft.models.config import LlamaConfig

TABLE = "prompt_embeddings"


def model_keys(cfg: LlamaConfig, num_virtual_tokens: int, prefix: bool) -> dict[str, Any]:
    """The model-shape keys of a prompt-learning ``adapter_config.json``.

    For prefixes peft sizes everything by the *key/value* width (GQA):
    ``token_dim = kv_heads * head_dim`` and ``num_attention_heads = kv_heads``; soft
    prompts use the hidden size and the query heads.

    Example:
        >>> cfg = LlamaConfig(vocab_size=8, hidden_size=16, intermediate_size=8,
        ...                   num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
        >>> model_keys(cfg, 5, prefix=True)["token_dim"]
        8
    """
    if prefix:
        token_dim, heads = prefix_token_dim(cfg), cfg.num_key_value_heads
    else:
        token_dim, heads = cfg.hidden_size, cfg.num_attention_heads
    return {
        "num_virtual_tokens": num_virtual_tokens,
        "token_dim": token_dim,
        "num_transformer_submodules": 1,
        "num_attention_heads": heads,
        "num_layers": cfg.num_hidden_layers,
        "modules_to_save": None,
    }


def prefix_token_dim(cfg: LlamaConfig) -> int:
    """Width of one layer's keys (or values) for one token: ``kv_heads * head_dim``."""
    return cfg.num_key_value_heads * cfg.head_dim


def check_model(config: AdapterConfig, cfg: LlamaConfig, prefix: bool) -> int:
    """Raise ``ValueError`` unless ``config`` was made for a model shaped like ``cfg``.

    Returns ``num_virtual_tokens``.

    Example:
        >>> cfg = LlamaConfig(vocab_size=8, hidden_size=16, intermediate_size=8,
        ...                   num_hidden_layers=2, num_attention_heads=4)
        >>> check_model(AdapterConfig(model_keys(cfg, 5, prefix=False)), cfg, prefix=False)
        5
    """
    expected = model_keys(cfg, 0, prefix)
    for key in ("token_dim", "num_layers"):
        found = config.get(key, int)
        if found is not None and found != expected[key]:
            raise ValueError(f"{config.source}: {key}={found}, the model has {expected[key]}")
    if config.get("num_transformer_submodules", int, 1) != 1:
        raise config.error("num_transformer_submodules", "1 (a decoder-only LLaMA has 1)")
    n = config.require("num_virtual_tokens", int)
    if n <= 0:
        raise config.error("num_virtual_tokens", "a positive int")
    return n


def check_virtual_tokens(owner: str, n: int) -> None:
    """Raise ``ValueError`` unless ``n`` is a positive number of virtual tokens."""
    if not isinstance(n, int) or isinstance(n, bool) or n <= 0:
        raise ValueError(f"{owner}: num_virtual_tokens={n!r} must be a positive int")
