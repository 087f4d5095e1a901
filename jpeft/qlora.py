"""QLoRA (Dettmers et al. 2023): NF4 (+ double quantization) base linears with LoRA on top."""

from __future__ import annotations

import dataclasses

import jax

from jpeft.lora import LoRA
from jpeft.method import Params
from jpeft.models.config import LlamaConfig
from jpeft.models.hf_names import PROJECTIONS, group_of
from jpeft.quant import QuantizedWeight, quantize


@dataclasses.dataclass(frozen=True)
class QLoRA(LoRA):
    """LoRA over 4-bit base weights: every linear inside the decoder layers is quantized.

    Embeddings, ``lm_head`` and norms stay as they are. The adapter is a plain LoRA
    adapter, so peft loads it over a bitsandbytes 4-bit model (``peft_type`` LORA).
    Kernels that are already quantized (``hf.load_pretrained(..., quantize="nf4")``, a
    bitsandbytes 4-bit checkpoint) are kept if they use this method's settings; other
    settings raise rather than being silently kept or requantized.

    Example:
        >>> method = QLoRA(r=64, alpha=16, dropout=0.1, targets="all-linear")
        >>> params = method.init(jax.random.key(0), params, cfg)       # doctest: +SKIP
    """

    quant_type: str = "nf4"
    blocksize: int = 64
    double_quant: bool = True

    def init(self, key: jax.Array, params: Params, cfg: LlamaConfig) -> Params:
        return super().init(key, quantize_linears(params, self), cfg)


def quantize_linears(params: Params, method: QLoRA) -> Params:
    """``params`` with every decoder projection kernel quantized (already-quantized kept)."""
    layers = {group: dict(entries) for group, entries in params["layers"].items()}
    for module in PROJECTIONS:
        entry = dict(layers[group_of(module)][module])
        kernel = entry["kernel"]
        if isinstance(kernel, QuantizedWeight):
            _check_settings(kernel, method, module)
        else:
            entry["kernel"] = quantize(
                kernel, method.quant_type, method.blocksize, method.double_quant
            )
        layers[group_of(module)][module] = entry
    return {**params, "layers": layers}


def _check_settings(kernel: QuantizedWeight, method: QLoRA, module: str) -> None:
    found = dict(
        quant_type=kernel.quant_type,
        blocksize=kernel.blocksize,
        double_quant=kernel.double_quant,
    )
    wanted = dict(
        quant_type=method.quant_type, blocksize=method.blocksize, double_quant=method.double_quant
    )
    if found != wanted:
        raise ValueError(
            f"QLoRA: {module} is already quantized with {found}, but the method asks for "
            f"{wanted}; use QLoRA with the base's settings, or load the base unquantized"
        )
