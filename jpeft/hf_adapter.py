"""Read and write HF peft adapter directories (``adapter_config.json`` + safetensors)."""

from __future__ import annotations

import json
import os
from typing import Any

import numpy as np
from safetensors.numpy import save_file

from jpeft.method import Method, Params, method_for
from jpeft.models.atomic import atomic_path, write_json
from jpeft.models.config import LlamaConfig
from jpeft.models.safetensors_io import read_weights

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"


def save_hf_adapter(
    out_dir: str | os.PathLike,
    method: Method,
    params: Params,
    cfg: LlamaConfig,
    base_model_name_or_path: str | None = None,
) -> None:
    """Write ``method``'s trained nodes from ``params`` as a peft-loadable adapter directory.

    ``base_model_name_or_path`` defaults to the directory ``cfg`` was read from
    (``cfg.name_or_path``); a local directory is recorded as an absolute path, so
    ``AutoPeftModelForCausalLM.from_pretrained(out_dir)`` finds the base from anywhere.

    Example:
        >>> jpeft.save_hf_adapter("out/adapter", method, params, cfg)   # doctest: +SKIP
        >>> # PeftModel.from_pretrained(hf_model, "out/adapter") now gives the same logits
    """
    out_dir = os.fspath(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    base_model_name_or_path = base_model_name_or_path or cfg.name_or_path
    if base_model_name_or_path is not None and os.path.isdir(base_model_name_or_path):
        base_model_name_or_path = os.path.abspath(base_model_name_or_path)
    config = {
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model_name_or_path,
        "inference_mode": True,
        "revision": None,
        **method.peft_config(cfg),
    }
    tensors = {k: np.ascontiguousarray(v) for k, v in method.peft_tensors(params, cfg).items()}
    with atomic_path(os.path.join(out_dir, WEIGHTS_NAME)) as tmp:
        save_file(tensors, tmp, metadata={"format": "pt"})
    write_json(os.path.join(out_dir, CONFIG_NAME), config)


def load_hf_adapter(
    adapter_dir: str | os.PathLike, params: Params, cfg: LlamaConfig, allow_nonfinite: bool = False
) -> tuple[Method, Params]:
    """Read a peft adapter directory and apply it over base ``params``.

    Its tensors must be floating point and finite (NaN/Inf refused, naming the tensor,
    unless ``allow_nonfinite``): see :func:`jpeft.models.safetensors_io.read_weights`.

    Example:
        >>> method, params = jpeft.load_hf_adapter("my-adapter", params, cfg)  # doctest: +SKIP
    """
    adapter_dir = os.fspath(adapter_dir)
    config_path = os.path.join(adapter_dir, CONFIG_NAME)
    if not os.path.exists(config_path):
        raise FileNotFoundError(f"no {CONFIG_NAME} in {adapter_dir}")
    with open(config_path) as f:
        config: dict[str, Any] = json.load(f)
    if "peft_type" not in config:
        raise ValueError(f"{config_path}: no 'peft_type' key")
    weights = os.path.join(adapter_dir, WEIGHTS_NAME)
    if not os.path.exists(weights):
        raise FileNotFoundError(f"no {WEIGHTS_NAME} in {adapter_dir}")
    tensors = read_weights(weights, allow_nonfinite)
    return method_for(config["peft_type"]).from_peft(config, tensors, params, cfg)
