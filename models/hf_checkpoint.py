"""An HF model directory's tensors: where each one is, which are packed, and whether they fit.

:class:`Checkpoint` opens ``model.safetensors`` or the shards of
``model.safetensors.index.json``, and :meth:`Checkpoint.check` compares every tensor
with what a :class:`LlamaConfig` needs before anything is loaded, so one error lists
every missing, unexpected or misshaped tensor with its file.
"""

from __future__ import annotations

import functools
import json
import operator
import os
from typing import Any

from jpeft.models.config import LlamaConfig
from jpeft.models.files import read_json, require_file
from jpeft.models.hf_names import PROJECTIONS, hf_key, tensor_slots
from jpeft.models.packed import packed_format
from jpeft.models.safetensors_io import SafetensorsFile, check_finite, is_float

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
_SHOWN = 20  # problems listed in one error


class Checkpoint:
    """The safetensors files of a model directory (a context manager closing them).

    Example:
        >>> with Checkpoint("assets/tiny-llama") as ckpt:
        ...     ckpt.reader("model.norm.weight").read("model.norm.weight").shape
        (128,)
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = os.fspath(path)
        self.files = _weight_files(self.path)
        self.format = packed_format(self.path)
        self.packed: set[str] = set()  # weight keys stored packed (found by check)
        self._readers = {
            name: SafetensorsFile(os.path.join(self.path, name))
            for name in set(self.files.values())
        }

    def __enter__(self) -> Checkpoint:
        return self

    def __exit__(self, *exc: object) -> None:
        for reader in self._readers.values():
            reader.close()

    def reader(self, key: str) -> SafetensorsFile:
        """The open file that holds tensor ``key``."""
        return self._readers[self.files[key]]

    def unpack(self, key: str, shape: tuple[int, ...], allow_nonfinite: bool = False) -> Any:
        """One layer's packed weight node (its tensors read whole: they are 4-bit small).

        Raises:
            ValueError: a floating-point part (absmax, quant_map...) holds NaN or Inf,
                unless ``allow_nonfinite``; the format's own errors.
        """
        tensors = {}
        for name in (key, *self.format.parts(key)):
            tensors[name] = self.reader(name).read(name)
            if not allow_nonfinite:
                check_finite(tensors[name], self.reader(name).path, name)
        return self.format.unpack(key, tensors, shape)

    def check(self, cfg: LlamaConfig, shapes: Any) -> None:
        """Raise one ValueError listing every missing, unexpected or misshaped tensor.

        ``shapes`` is the (stacked) params tree of ``cfg`` as shape structs. Records the
        packed weights in :attr:`packed`.
        """
        problems = []
        expected = set()
        for key, entry, layer, transposed in tensor_slots(cfg):
            expected.add(key)
            want = hf_shape(
                functools.reduce(operator.getitem, entry, shapes).shape, layer, transposed
            )
            problem = self._presence(key)
            if problem:
                problems.append(f"{problem} (expected shape {list(want)})")
            elif self._is_packed(key, entry, layer):
                self.packed.add(key)
                parts = self.format.parts(key)
                expected.update(parts)
                problems += [
                    f"{problem} (part of the packed weight {key!r})"
                    for part in parts
                    if (problem := self._presence(part))
                ]
            else:
                problems += _misfit(key, want, self.reader(key))
        problems += _mixed_packing(cfg, self.packed)
        for key in sorted(set(self.files) - expected):
            if not _ignored(key, cfg):
                problems.append(f"{self.reader(key).path}: unexpected tensor {key!r}")
        if problems:
            shown = "\n  ".join(problems[:_SHOWN])
            more = f"\n  ... and {len(problems) - _SHOWN} more" if len(problems) > _SHOWN else ""
            raise ValueError(
                f"{self.path}: checkpoint does not match its config.json:\n  {shown}{more}"
            )

    def _presence(self, key: str) -> str | None:
        if key not in self.files:
            return f"missing tensor {key!r}"
        if key not in self.reader(key):
            return f"{self.reader(key).path}: the index lists {key!r} but the file lacks it"
        return None

    def _is_packed(self, key: str, path: tuple, layer: int | None) -> bool:
        """Whether a present tensor is a packed linear kernel of a decoder layer."""
        if self.format is None or layer is None or path[-1] != "kernel":
            return False
        return self.format.is_packed(self.reader(key).dtype(key))


def hf_shape(stacked: tuple[int, ...], layer: int | None, transposed: bool) -> tuple[int, ...]:
    """The HF tensor shape of one slot, from our (layer-stacked) entry's shape."""
    shape = stacked if layer is None else stacked[1:]
    return shape[::-1] if transposed else shape


def _weight_files(path: str) -> dict[str, str]:
    """``{hf_key: file name}`` from the single file or the shard index (as transformers)."""
    single, index = os.path.join(path, SINGLE_FILE), os.path.join(path, INDEX_FILE)
    if os.path.lexists(single):  # a broken symlink or a loop is named, not skipped
        with SafetensorsFile(single) as f:
            return dict.fromkeys(f.keys(), SINGLE_FILE)
    if not os.path.lexists(index):
        raise FileNotFoundError(
            f"{path}: no {SINGLE_FILE} or {INDEX_FILE} (found {sorted(os.listdir(path))})"
        )
    content = read_json(index)
    weight_map = content.get("weight_map") if isinstance(content, dict) else None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise ValueError(
            f"{index}: not a safetensors index: expected an object with a 'weight_map' "
            f"object of file names, found {_brief(content)}"
        )
    for name in sorted(set(weight_map.values())):
        shard = os.path.join(path, name)
        if not os.path.lexists(shard):
            raise FileNotFoundError(f"{index} lists shard {name!r}, which is not in {path}")
        require_file(shard)
    return dict(weight_map)


def _brief(value: object) -> str:
    """A short description of a JSON value for an error message."""
    text = json.dumps(value)
    return text if len(text) <= 80 else f"{text[:77]}..."


def _ignored(key: str, cfg: LlamaConfig) -> bool:
    """Tensors transformers also skips: cached RoPE tables, a tied model's lm_head."""
    return key.endswith("rotary_emb.inv_freq") or (
        cfg.tie_word_embeddings and key == "lm_head.weight"
    )


def _misfit(key: str, want: tuple[int, ...], reader: SafetensorsFile) -> list[str]:
    problems = []
    found = reader.shape(key)
    if found != want:
        problems.append(
            f"{reader.path}: tensor {key!r} has shape {list(found)}, expected {list(want)}"
        )
    if not is_float(reader.dtype(key)):
        problems.append(
            f"{reader.path}: tensor {key!r} has dtype {reader.dtype(key)}, "
            "expected a floating-point dtype"
        )
    return problems


def _mixed_packing(cfg: LlamaConfig, packed: set[str]) -> list[str]:
    """A projection must be packed in every layer or in none (layers are stacked)."""
    problems = []
    for module in PROJECTIONS:
        layers = [i for i in range(cfg.num_hidden_layers) if hf_key(i, module) in packed]
        if 0 < len(layers) < cfg.num_hidden_layers:
            problems.append(
                f"{module} is quantized in layers {layers} only; jpeft stacks the layers and "
                "needs every layer's weight in the same format"
            )
    return problems
