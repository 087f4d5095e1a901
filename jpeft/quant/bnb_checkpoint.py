"""bitsandbytes 4-bit HF checkpoints ("*-bnb-4bit" models) loaded as they are.

transformers saves a ``Linear4bit`` weight ``W`` (torch ``[out, in]``) as:

* ``W`` itself: uint8 ``[(out * in + 1) // 2, 1]``, the packed codes in bitsandbytes'
  flat layout (:func:`jpeft.quant.quantize_4bit`);
* ``W.absmax``: fp32 per block, or its uint8 codes under double quantization;
* ``W.quant_map``: the 16 code values (``weight.quant_map`` == :func:`code_table`);
* with double quantization ``W.nested_absmax`` (fp32 per 256 codes) and
  ``W.nested_quant_map`` (the signed 8-bit dynamic map);
* ``W.quant_state.bitsandbytes__{nf4|fp4}``: uint8 bytes of a JSON dict with
  ``quant_type``, ``blocksize``, ``dtype``, ``shape`` and, nested, ``nested_blocksize``,
  ``nested_dtype`` and ``nested_offset``.

:func:`bnb_4bit_format` reads them into a :class:`QuantizedWeight` (in the kernel layout
when ``in % blocksize == 0``, else bitsandbytes' flat layout; :mod:`jpeft.quant.layout`):
the same bits :func:`jpeft.quant.quantize` gives for the fp32 weights the
checkpoint was made from (``tests/test_bnb_checkpoint.py``). ``jpeft.quant``
registers it, so ``jpeft.models.hf.load_pretrained`` reads such a directory directly.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp
import numpy as np

from jpeft.quant.double import NESTED_BLOCKSIZE
from jpeft.quant.dynamic import dynamic_map
from jpeft.quant.fourbit import check_blocksize, check_quant_type, code_table
from jpeft.quant.layout import bnb_to_layout
from jpeft.quant.node import QuantizedWeight


@dataclasses.dataclass(frozen=True)
class Bnb4bitFormat:
    """The tensors of one bitsandbytes 4-bit checkpoint's packed weights.

    Example:
        >>> fmt = Bnb4bitFormat("nf4", double_quant=True)
        >>> fmt.parts("w")[-1]
        'w.quant_state.bitsandbytes__nf4'
    """

    quant_type: str
    double_quant: bool

    def is_packed(self, dtype: np.dtype) -> bool:
        """bitsandbytes stores packed codes as uint8; a float ``weight`` is a skipped module."""
        return np.dtype(dtype) == np.uint8

    def parts(self, key: str) -> tuple[str, ...]:
        """The tensors besides ``key`` that hold it."""
        nested = ("nested_absmax", "nested_quant_map") if self.double_quant else ()
        return (*(f"{key}.{name}" for name in ("absmax", "quant_map", *nested)), self._state(key))

    def _state(self, key: str) -> str:
        """The tensor holding ``key``'s quant_state JSON."""
        return f"{key}.quant_state.bitsandbytes__{self.quant_type}"

    def unpack(
        self, key: str, tensors: Mapping[str, np.ndarray], shape: tuple[int, int]
    ) -> QuantizedWeight:
        """One layer's :class:`QuantizedWeight` from its tensors (see the module docstring)."""
        state = _quant_state(key, tensors[self._state(key)])
        blocksize = self._check_state(key, state, shape)
        _check_table(key, "quant_map", tensors[f"{key}.quant_map"], code_table(self.quant_type))
        absmax = tensors[f"{key}.absmax"]
        _check_dtype(key, "absmax", absmax, np.uint8 if self.double_quant else np.float32)
        _check_dtype(key, "", tensors[key], np.uint8)
        packed, absmax = bnb_to_layout(key, tensors[key], absmax, shape, blocksize)
        codes = nested = offset = None
        if self.double_quant:
            signed = np.asarray(dynamic_map(signed=True), np.float32)
            _check_table(key, "nested_quant_map", tensors[f"{key}.nested_quant_map"], signed)
            nested = tensors[f"{key}.nested_absmax"]
            _check_dtype(key, "nested_absmax", nested, np.float32)
            want = (-(-absmax.size // NESTED_BLOCKSIZE),)
            if nested.shape != want:
                raise ValueError(
                    f"{key}.nested_absmax: shape {list(nested.shape)}, expected {list(want)} "
                    f"(one per {NESTED_BLOCKSIZE} absmax codes)"
                )
            codes, absmax, nested = jnp.asarray(absmax), None, jnp.asarray(nested)
            offset = jnp.float32(state["nested_offset"])  # JSON holds the fp32 value exactly
        return QuantizedWeight(
            packed=jnp.asarray(packed),
            absmax=None if absmax is None else jnp.asarray(absmax),
            quantized_absmax=codes,
            nested_absmax=nested,
            nested_offset=offset,
            quant_type=self.quant_type,
            blocksize=blocksize,
            in_features=shape[1],
            out_features=shape[0],
        )

    def _check_state(self, key: str, state: dict[str, Any], shape: tuple[int, int]) -> int:
        """Validate a weight's quant_state against the config and the model; its blocksize."""
        expected = {"quant_type": self.quant_type, "shape": list(shape)}
        if self.double_quant:
            expected["nested_blocksize"] = NESTED_BLOCKSIZE
        wrong = {k: state.get(k) for k, v in expected.items() if state.get(k) != v}
        if wrong or self.double_quant != ("nested_offset" in state):
            raise ValueError(
                f"{key}: quant_state {state} does not match the checkpoint "
                f"(expected {expected}, double quantization {self.double_quant})"
            )
        try:
            return check_blocksize(state.get("blocksize"))
        except ValueError as e:
            raise ValueError(f"{key}: quant_state {e}") from e


def bnb_4bit_format(config: dict[str, Any]) -> Bnb4bitFormat:
    """The format of a checkpoint from its ``quantization_config`` (bitsandbytes 4-bit only).

    Example:
        >>> bnb_4bit_format({"quant_method": "bitsandbytes", "load_in_4bit": True,
        ...                  "bnb_4bit_quant_type": "nf4", "bnb_4bit_use_double_quant": True})
        Bnb4bitFormat(quant_type='nf4', double_quant=True)
    """
    if config.get("load_in_8bit") or not config.get("load_in_4bit"):
        raise ValueError(
            "only bitsandbytes 4-bit checkpoints (load_in_4bit) are supported, not 8-bit "
            f"LLM.int8 ones; quantization_config: {config}"
        )
    storage = config.get("bnb_4bit_quant_storage", "uint8")
    if storage != "uint8":
        raise ValueError(f"bnb_4bit_quant_storage={storage!r} is not supported (only 'uint8')")
    quant_type = check_quant_type(config.get("bnb_4bit_quant_type", "fp4"))
    return Bnb4bitFormat(quant_type, bool(config.get("bnb_4bit_use_double_quant", False)))


def _quant_state(key: str, raw: np.ndarray) -> dict[str, Any]:
    try:
        state = json.loads(np.asarray(raw, np.uint8).tobytes().decode())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{key}: its quant_state tensor is not a JSON dict ({e})") from e
    if not isinstance(state, dict):
        raise ValueError(f"{key}: its quant_state is a {type(state).__name__}, not a dict")
    return state


def _check_table(key: str, name: str, found: np.ndarray, want: np.ndarray) -> None:
    if found.shape != want.shape or not np.array_equal(found.astype(np.float32), want):
        raise ValueError(
            f"{key}.{name}: not the standard {want.size}-entry table jpeft decodes with "
            f"(found shape {list(found.shape)}); custom code tables are not supported"
        )


def _check_dtype(key: str, name: str, found: np.ndarray, want: type) -> None:
    if found.dtype != np.dtype(want):
        label = f"{key}.{name}" if name else key
        raise ValueError(f"{label}: dtype {found.dtype}, expected {np.dtype(want)}")
