"""Write our params as a Hugging Face LLaMA directory transformers loads.

Tensors are produced one at a time (one layer of one entry, PEFT nodes folded by
:func:`jpeft.models.linear.dense`), so saving needs no full host copy of the model.
Every file goes through :func:`jpeft.models.atomic.atomic_path`: written to a temporary
name in the target directory, fsynced, renamed, with the umask's permissions.
"""

from __future__ import annotations

import functools
import operator
import os
import re
import shutil
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
from jax.typing import DTypeLike

from jpeft.models.atomic import atomic_path, write_json
from jpeft.models.config import LlamaConfig
from jpeft.models.hf_names import check_placed, tensor_slots
from jpeft.models.linear import dense
from jpeft.models.safetensors_io import write_file

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "added_tokens.json",
    "chat_template.jinja",
)
_SHARD = re.compile(r"model(-\d{5}-of-\d{5})?\.safetensors(\.index\.json)?")
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9}
_UNITS |= {"KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


def save_pretrained(
    path: str | os.PathLike,
    cfg: LlamaConfig,
    params: dict[str, Any],
    dtype: DTypeLike | None = None,
    max_shard_size: int | str = "5GB",
    tokenizer_dir: str | os.PathLike | None = None,
) -> None:
    """Write ``config.json`` and ``model.safetensors`` (or shards plus their index).

    Args:
        path: target directory (created; stale weight files of an earlier save removed).
        cfg: the model config, written as ``config.json``.
        params: plain or PEFT params; nodes at tensor slots (LoRA, NF4, ...) are folded
            with :func:`jpeft.models.linear.dense` (what ``jpeft.merge`` gives). Entries with no
            place in a plain LLaMA (prompts, prefixes, adapters) raise ``ValueError``.
        dtype: dtype of the stored tensors; None keeps each tensor's own dtype.
        max_shard_size: bytes per file (int, or ``"500MB"``, ``"5GB"``, ``"2GiB"``);
            above it the weights are split into ``model-0000i-of-0000n.safetensors``
            with ``model.safetensors.index.json``. A tensor is never split.
        tokenizer_dir: a directory whose tokenizer files (``tokenizer.json`` ...) are
            copied alongside.

    Example:
        >>> import tempfile, jpeft, jax.numpy as jnp
        >>> from jpeft.models import hf
        >>> cfg, params = hf.load_pretrained("assets/tiny-llama")
        >>> params = jpeft.LoRA(r=2).init(jax.random.key(0), params, cfg)
        >>> out = os.path.join(tempfile.mkdtemp(), "merged")
        >>> save_pretrained(out, cfg, jpeft.merge(params), dtype=jnp.bfloat16)
        >>> sorted(os.listdir(out))  # transformers' from_pretrained reads it
        ['config.json', 'model.safetensors']
    """
    path = os.fspath(path)
    check_placed(params, cfg)
    tokenizer_files = [] if tokenizer_dir is None else _tokenizer_files(os.fspath(tokenizer_dir))
    specs, produce = _tensor_specs(params, cfg, dtype)
    shards = _plan_shards(specs, _parse_size(max_shard_size))
    os.makedirs(path, exist_ok=True)
    weight_map, total = {}, 0
    for name, shard in shards.items():
        with atomic_path(os.path.join(path, name)) as tmp:
            total += write_file(tmp, shard, produce)
        weight_map.update(dict.fromkeys((key for key, _, _ in shard), name))
    written = set(shards)
    if len(shards) > 1:
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        write_json(os.path.join(path, "model.safetensors.index.json"), index)
        written.add("model.safetensors.index.json")
    for stale in os.listdir(path):
        if _SHARD.fullmatch(stale) and stale not in written:
            os.remove(os.path.join(path, stale))
    hf_config = cfg.to_hf()
    hf_config["dtype"] = np.dtype(specs[0][2]).name
    write_json(os.path.join(path, "config.json"), hf_config)
    for src in tokenizer_files:
        dst = os.path.join(path, os.path.basename(src))
        if not (os.path.exists(dst) and os.path.samefile(src, dst)):
            with atomic_path(dst) as tmp:
                shutil.copyfile(src, tmp)


Spec = tuple[str, tuple[int, ...], np.dtype]


def _tensor_specs(
    params: dict[str, Any], cfg: LlamaConfig, dtype: DTypeLike | None
) -> tuple[list[Spec], Callable[[str], np.ndarray]]:
    """``(key, shape, dtype)`` of every HF tensor, and a function producing one of them."""
    slots = {key: (path, layer, transposed) for key, path, layer, transposed in tensor_slots(cfg)}

    def compute(key: str) -> jax.Array:
        path, layer, transposed = slots[key]
        node = functools.reduce(operator.getitem, path, params)
        if layer is not None:
            node = jax.tree.map(lambda a: a[layer], node)
        array = dense(node)
        array = array if dtype is None else array.astype(dtype)
        return array.T if transposed else array

    specs = []
    for key in slots:
        out = jax.eval_shape(lambda key=key: compute(key))
        specs.append((key, out.shape, np.dtype(out.dtype)))
    return specs, lambda key: np.asarray(jax.device_get(compute(key)))


def _plan_shards(specs: list[Spec], max_bytes: int) -> dict[str, list[Spec]]:
    """Greedy split in slot order: ``{file name: specs}``."""
    groups: list[list[Spec]] = [[]]
    size = 0
    for spec in specs:
        nbytes = int(np.prod(spec[1])) * spec[2].itemsize
        if groups[-1] and size + nbytes > max_bytes:
            groups.append([])
            size = 0
        groups[-1].append(spec)
        size += nbytes
    if len(groups) == 1:
        return {"model.safetensors": groups[0]}
    n = len(groups)
    return {f"model-{i + 1:05d}-of-{n:05d}.safetensors": g for i, g in enumerate(groups)}


def _parse_size(size: int | str) -> int:
    if isinstance(size, int):
        value = size
    else:
        match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", size)
        unit = match.group(2).upper() if match else None
        if unit not in _UNITS:
            raise ValueError(f"max_shard_size={size!r}; expected bytes or e.g. '500MB', '5GB'")
        value = int(float(match.group(1)) * _UNITS[unit])
    if value <= 0:
        raise ValueError(f"max_shard_size={size!r} must be positive")
    return value


def _tokenizer_files(src: str) -> list[str]:
    paths = [os.path.join(src, n) for n in TOKENIZER_FILES if os.path.isfile(os.path.join(src, n))]
    if not paths:
        raise ValueError(f"tokenizer_dir={src!r} holds none of {list(TOKENIZER_FILES)}")
    return paths
