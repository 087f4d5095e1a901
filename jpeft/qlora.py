"""QLoRA (Dettmers et al. 2023): NF4 (+ double quantization) base linears with LoRA on top."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax

from jpeft.lora import LoRA
from jpeft.models.config import LlamaConfig
from jpeft.models.param_spec import PROJECTIONS, group_of
from jpeft.models.pytree import Params
from jpeft.quant import QuantizedWeight, quantize


@dataclasses.dataclass(frozen=True)
class QLoRA(LoRA):
    """LoRA over 4-bit base weights: every linear inside the decoder layers is quantized.

    Embeddings, ``lm_head`` and norms stay as they are. The adapter is a plain LoRA
    adapter, so peft loads it over a bitsandbytes 4-bit model (``peft_type`` LORA).
    Kernels that are already quantized (``hf.load_pretrained(..., quantize="nf4")``, a
    bitsandbytes 4-bit checkpoint) are kept if they use this method's settings; other
    settings raise rather than being silently kept or requantized. The defaults are the
    QLoRA paper's recipe (transformers' ``BitsAndBytesConfig`` defaults for NF4), and
    ``load_pretrained(..., quantize="nf4")`` quantizes with them (:mod:`jpeft.plugins`).

    Example:
        >>> method = QLoRA(r=64, alpha=16, dropout=0.1, targets="all-linear")
        >>> import jax
        >>> from jpeft.models import hf, llama
        >>> cfg, base = hf.load_pretrained("assets/tiny-llama")
        >>> params = method.init(jax.random.key(0), base, cfg)
        >>> type(params["layers"]["mlp"]["up_proj"]["kernel"]).__name__
        'LoRAWeight'
    """

    quant_type: str = "nf4"
    blocksize: int = 64
    double_quant: bool = True

    def init(self, key: jax.Array, params: Params, cfg: LlamaConfig) -> Params:
        return super().init(key, quantize_linears(params, self), cfg)

    def quantize(self, kernel: jax.Array, module: str | None = None) -> QuantizedWeight:
        """``kernel [..., in, out]`` quantized with this method's settings.

        ``method.quantize`` is also a ``load_pretrained`` quantizer (``quantize=``).

        Example:
            >>> QLoRA().quantize(jax.numpy.ones((64, 2))).quant_type
            'nf4'
        """
        return quantize(kernel, self.quant_type, self.blocksize, self.double_quant)

    def settings(self) -> dict[str, Any]:
        """``{quant_type, blocksize, double_quant}`` of this method."""
        return dict(
            quant_type=self.quant_type, blocksize=self.blocksize, double_quant=self.double_quant
        )


def quantize_linears(params: Params, method: QLoRA) -> Params:
    """``params`` with every decoder projection kernel quantized (already-quantized kept)."""
    layers = {group: dict(entries) for group, entries in params["layers"].items()}
    for module in PROJECTIONS:
        entry = dict(layers[group_of(module)][module])
        kernel = entry["kernel"]
        if isinstance(kernel, QuantizedWeight):
            _check_settings(kernel, method, module)
        else:
            entry["kernel"] = method.quantize(kernel, module)
        layers[group_of(module)][module] = entry
    return {**params, "layers": layers}


def _check_settings(kernel: QuantizedWeight, method: QLoRA, module: str) -> None:
    found = dict(
        quant_type=kernel.quant_type,
        blocksize=kernel.blocksize,
        double_quant=kernel.double_quant,
    )
    wanted = method.settings()
    if found != wanted:
        raise ValueError(
            f"QLoRA: {module} is already quantized with {found}, but the method asks for "
            f"{wanted}; use QLoRA with the base's settings, or load the base unquantized"
        )
