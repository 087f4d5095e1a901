"""Load Hugging Face LLaMA checkpoints (config.json + safetensors) into our params.

Loading streams one tensor at a time: each HF tensor is read from disk (only its
own bytes), transposed and cast on the device, and written in place into its
preallocated stacked ``[L, ...]`` entry (a donated update). Host memory beyond
the final params stays at a few copies of the largest single tensor.

Quantization plugs in through :func:`register_quantizer`; ``jpeft.quant``
registers ``"nf4"``. :func:`save_pretrained` lives in :mod:`models.hf_save`.
"""

from __future__ import annotations

import functools
import json
import operator
import os
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jax.typing import DTypeLike

from models.config import LlamaConfig
from models.hf_names import tensor_slots
from models.hf_save import save_pretrained
from models.llama import Params, init_params
from models.safetensors_io import SafetensorsFile

__all__ = ["QUANTIZERS", "Quantizer", "load_pretrained", "register_quantizer", "save_pretrained"]

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"

Quantizer = Callable[[jax.Array, str], Any]
"""``fn(kernel, module) -> node``: quantize ONE layer's linear kernel while loading.

* ``kernel``: a ``jax.Array [in, out]`` (our layout, HF's weight transposed) in the
  ``dtype`` passed to :func:`load_pretrained`, on the default device.
* ``module``: the HF projection name (``"q_proj"`` ... ``"down_proj"``).
* returns a weight node for that one layer: any pytree for which
  :func:`models.linear.matmul` and :func:`models.linear.dense` are registered. Every
  layer must give the same tree structure, leaf shapes and dtypes. The loader stacks
  the leaves along a new leading layer axis and puts the stacked node at
  ``params["layers"][group][module]["kernel"]``; the scanned forward slices it back.

Only the linear kernels inside the decoder layers are quantized (the QLoRA recipe):
embeddings, ``lm_head``, norms and biases stay in ``dtype``.
"""

QUANTIZERS: dict[str, Quantizer] = {}


def register_quantizer(name: str, fn: Quantizer) -> None:
    """Make ``load_pretrained(..., quantize=name)`` call ``fn`` (see :data:`Quantizer`).

    Example:
        >>> register_quantizer("identity", lambda kernel, module: kernel)
        >>> cfg, params = load_pretrained("tiny-llama", quantize="identity")  # doctest: +SKIP
    """
    QUANTIZERS[name] = fn


def load_pretrained(
    path: str | os.PathLike, dtype: DTypeLike = jnp.float32, quantize: str | None = None
) -> tuple[LlamaConfig, Params]:
    """Read an HF LLaMA directory: ``config.json`` plus ``model.safetensors`` or shards.

    Args:
        path: the model directory.
        dtype: dtype of every loaded param (checkpoints in any float dtype are cast).
        quantize: name of a registered :data:`Quantizer` applied to each layer's
            linear kernels (``"nf4"`` once ``jpeft.quant`` is imported), or None.

    Raises:
        FileNotFoundError: no ``config.json`` or no safetensors weights.
        ValueError: missing, unexpected or misshaped tensors (naming file, key and
            both shapes), a corrupt or truncated file, an unknown ``quantize``.

    Example:
        >>> cfg, params = load_pretrained("Llama-3.2-1B", dtype=jnp.bfloat16)  # doctest: +SKIP
        >>> params["layers"]["self_attn"]["q_proj"]["kernel"].shape  # doctest: +SKIP
        (16, 2048, 2048)
    """
    quantizer = _quantizer(quantize)
    cfg = LlamaConfig.from_json(path)
    shapes = jax.eval_shape(lambda: init_params(jax.random.key(0), cfg))
    files = _weight_files(os.fspath(path))
    readers = {name: SafetensorsFile(os.path.join(path, name)) for name in set(files.values())}
    try:
        _check(cfg, shapes, files, readers)
        return cfg, _assemble(cfg, files, readers, dtype, quantizer)
    finally:
        for reader in readers.values():
            reader.close()


def _quantizer(quantize: str | None) -> Quantizer | None:
    if quantize is None:
        return None
    if quantize not in QUANTIZERS:
        raise ValueError(
            f"quantize={quantize!r} has no registered quantizer (registered: "
            f"{sorted(QUANTIZERS)}); quantize='nf4' needs jpeft.quant: `import jpeft.quant` "
            "registers it"
        )
    return QUANTIZERS[quantize]


def _weight_files(path: str) -> dict[str, str]:
    """``{hf_key: file name}`` from the single file or the shard index (as transformers)."""
    if os.path.isfile(os.path.join(path, SINGLE_FILE)):
        with SafetensorsFile(os.path.join(path, SINGLE_FILE)) as f:
            return dict.fromkeys(f.keys(), SINGLE_FILE)
    index = os.path.join(path, INDEX_FILE)
    if not os.path.isfile(index):
        raise FileNotFoundError(
            f"{path}: no {SINGLE_FILE} or {INDEX_FILE} (found {sorted(os.listdir(path))})"
        )
    try:
        with open(index) as f:
            weight_map = json.load(f)["weight_map"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise ValueError(f"{index}: not a safetensors index with a 'weight_map' ({e})") from e
    for name in sorted(set(weight_map.values())):
        if not os.path.isfile(os.path.join(path, name)):
            raise FileNotFoundError(f"{index} lists shard {name!r}, which is not in {path}")
    return dict(weight_map)


def _ignored(key: str, cfg: LlamaConfig) -> bool:
    """Tensors transformers also skips: cached RoPE tables, a tied model's lm_head."""
    return key.endswith("rotary_emb.inv_freq") or (
        cfg.tie_word_embeddings and key == "lm_head.weight"
    )


def _check(cfg: LlamaConfig, shapes: Params, files: dict, readers: dict) -> None:
    """Raise one ValueError listing every missing, unexpected or misshaped tensor."""
    problems = []
    expected = set()
    for key, path, layer, transposed in tensor_slots(cfg):
        expected.add(key)
        want = _hf_shape(functools.reduce(operator.getitem, path, shapes).shape, layer, transposed)
        if key not in files:
            problems.append(f"missing tensor {key!r} (expected shape {list(want)})")
            continue
        reader = readers[files[key]]
        if key not in reader:
            problems.append(f"{reader.path}: the index lists {key!r} but the file lacks it")
            continue
        found = reader.shape(key)
        if found != want:
            problems.append(
                f"{reader.path}: tensor {key!r} has shape {list(found)}, expected {list(want)}"
            )
        if not jnp.issubdtype(reader.dtype(key), jnp.floating):
            problems.append(f"{reader.path}: tensor {key!r} has dtype {reader.dtype(key)}")
    for key in sorted(set(files) - expected):
        if not _ignored(key, cfg):
            problems.append(f"{files[key]}: unexpected tensor {key!r}")
    if problems:
        shown = "\n  ".join(problems[:20])
        more = f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else ""
        raise ValueError(f"checkpoint does not match its config.json:\n  {shown}{more}")


def _hf_shape(stacked: tuple[int, ...], layer: int | None, transposed: bool) -> tuple[int, ...]:
    shape = stacked if layer is None else stacked[1:]
    return shape[::-1] if transposed else shape


def _assemble(
    cfg: LlamaConfig, files: dict, readers: dict, dtype: DTypeLike, quantizer: Quantizer | None
) -> Params:
    params: Params = {}
    stacks: dict[tuple, _Stack] = {}
    for key, path, layer, transposed in tensor_slots(cfg):
        x = _prepare(readers[files[key]].read(key), transposed, jnp.dtype(dtype))
        if layer is None:
            _put(params, path, x)
            continue
        if quantizer is not None and path[-1] == "kernel":
            x = quantizer(x, path[-2])
        stacks.setdefault(path, _Stack(key, cfg.num_hidden_layers)).put(layer, x)
    for path, stack in stacks.items():
        _put(params, path, stack.value())
    return params


class _Stack:
    """A stacked ``[L, ...]`` entry filled layer by layer with donated in-place updates."""

    def __init__(self, key: str, n_layers: int) -> None:
        self.key, self.n_layers = key, n_layers
        self.treedef: Any = None
        self.buffers: list[jax.Array] = []

    def put(self, layer: int, node: Any) -> None:
        leaves, treedef = jax.tree.flatten(node)
        specs = [(leaf.shape, leaf.dtype) for leaf in leaves]
        if self.treedef is None:
            self.treedef = treedef
            self.buffers = [jnp.zeros((self.n_layers, *s), d) for s, d in specs]
        elif treedef != self.treedef or specs != [(b.shape[1:], b.dtype) for b in self.buffers]:
            raise ValueError(
                f"{self.key}: the quantizer gave layer {layer} a different structure "
                f"({treedef}, {specs}) than layer 0"
            )
        self.buffers = [
            _write(b, leaf, layer) for b, leaf in zip(self.buffers, leaves, strict=True)
        ]
        jax.block_until_ready(self.buffers)  # bound host staging to one tensor at a time

    def value(self) -> Any:
        return jax.tree.unflatten(self.treedef, self.buffers)


@jax.jit(static_argnames=("transposed", "dtype"))
def _prepare(raw: jax.Array, transposed: bool, dtype: jnp.dtype) -> jax.Array:
    return (raw.T if transposed else raw).astype(dtype)


@jax.jit(donate_argnums=0)
def _write(buffer: jax.Array, value: jax.Array, layer: int) -> jax.Array:
    return jax.lax.dynamic_update_index_in_dim(buffer, value, layer, 0)


def _put(tree: dict, path: tuple, value: Any) -> None:
    for part in path[:-1]:
        tree = tree.setdefault(part, {})
    tree[path[-1]] = value
