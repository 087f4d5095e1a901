"""Save and load adapter directories (``adapter_config.json`` + safetensors), peft's layout."""

from __future__ import annotations

import os
from typing import Any

import jax
import numpy as np
from safetensors.numpy import save_file

from jpeft.adapter_files import CONFIG_NAME, WEIGHTS_NAME, read_adapter_dir
from jpeft.method import Method, method_for
from jpeft.model_card import write_model_card
from jpeft.models.atomic import atomic_path, write_json
from jpeft.models.config import LlamaConfig
from jpeft.models.files import read_json
from jpeft.models.pytree import Params
from jpeft.quant.node import QuantizedWeight

BASE_NAME = "jpeft_base.json"  # the base's quantization; a side file, which peft ignores


def save_hf_adapter(
    out_dir: str | os.PathLike,
    method: Method,
    params: Params,
    cfg: LlamaConfig,
    base_model_name_or_path: str | None = None,
) -> None:
    """Write ``method``'s trained nodes from ``params`` as an adapter directory (peft-loadable
    for peft's methods).

    ``base_model_name_or_path`` defaults to the directory ``cfg`` was read from
    (``cfg.name_or_path``); a local directory is recorded as an absolute path, so
    ``AutoPeftModelForCausalLM.from_pretrained(out_dir)`` finds the base from anywhere.
    A model card (``README.md``, :func:`jpeft.model_card.write_model_card`) names it too.

    Example:
        >>> import tempfile, jpeft
        >>> from jpeft.models import hf, llama
        >>> cfg, base = hf.load_pretrained("assets/tiny-llama")
        >>> method = jpeft.LoRA(r=2)
        >>> out = tempfile.mkdtemp()
        >>> jpeft.save_hf_adapter(out, method, method.init(jax.random.key(0), base, cfg), cfg)
        >>> sorted(os.listdir(out))  # peft's two files, a model card, the base's quantization
        ['README.md', 'adapter_config.json', 'adapter_model.safetensors', 'jpeft_base.json']
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
        **method.adapter_config(cfg),
    }
    tensors = {k: np.ascontiguousarray(v) for k, v in method.adapter_tensors(params, cfg).items()}
    with atomic_path(os.path.join(out_dir, WEIGHTS_NAME)) as tmp:
        save_file(tensors, tmp, metadata={"format": "pt"})
    write_json(os.path.join(out_dir, CONFIG_NAME), config)
    write_json(os.path.join(out_dir, BASE_NAME), {"quantization": _quantization(params)})
    write_model_card(out_dir, base_model_name_or_path, config["peft_type"])


def _quantization(params: Params) -> dict[str, Any] | None:
    """The 4-bit settings of the base's quantized kernels (QLoRA's NF4), or None."""
    quantized = lambda x: isinstance(x, QuantizedWeight)
    for leaf in jax.tree.leaves(params, is_leaf=quantized):
        if quantized(leaf):
            return {
                "quant_type": leaf.quant_type,
                "blocksize": leaf.blocksize,
                "double_quant": leaf.double_quant,
            }
    return None


def adapter_base_quantization(adapter_dir: str | os.PathLike) -> tuple[bool, dict[str, Any] | None]:
    """``(recorded, quantization)``: what base an adapter saved by jpeft was trained on.

    ``quantization`` is None for an unquantized base, else ``{"quant_type", "blocksize",
    "double_quant"}``; ``recorded`` is False for adapters saved elsewhere (no side file).

    Example:
        >>> adapter_base_quantization("no/such/adapter")
        (False, None)
    """
    path = os.path.join(adapter_dir, BASE_NAME)
    if not os.path.isfile(path):
        return False, None
    return True, read_json(path)["quantization"]


def load_hf_adapter(
    adapter_dir: str | os.PathLike, params: Params, cfg: LlamaConfig, allow_nonfinite: bool = False
) -> tuple[Method, Params]:
    """Read an adapter directory and apply it over base ``params``.

    Raises ``FileNotFoundError`` for a missing file and ``ValueError`` naming the
    file and key or tensor for anything the method cannot use as it is. Its tensors
    must be floating point and finite (NaN/Inf refused, naming the tensor, unless
    ``allow_nonfinite``): see :func:`jpeft.models.safetensors_io.read_weights`.

    Example:
        >>> import tempfile, jpeft
        >>> from jpeft.models import hf, llama
        >>> cfg, base = hf.load_pretrained("assets/tiny-llama")
        >>> out = tempfile.mkdtemp()
        >>> trained = jpeft.LoRA(r=2).init(jax.random.key(0), base, cfg)
        >>> jpeft.save_hf_adapter(out, jpeft.LoRA(r=2), trained, cfg)
        >>> method, params = jpeft.load_hf_adapter(out, base, cfg)
        >>> method.r, params["layers"]["self_attn"]["q_proj"]["kernel"].names
        (2, ('default',))
    """
    config, tensors = read_adapter_dir(adapter_dir, allow_nonfinite)
    method = method_for(config.require("peft_type", str))
    return method.from_adapter(config, tensors, params, cfg)
