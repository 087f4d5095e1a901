"""Load Hugging Face LLaMA checkpoints (config.json + safetensors) into our params.

Loading streams: each HF tensor is read from disk in chunks of at most
:data:`CHUNK_BYTES` (only its own bytes), each chunk is transposed and cast on the
device and written in place into the preallocated (stacked ``[L, ...]``) entry by a
donated update, and checked for NaN/Inf there. Host memory beyond the final params
stays at about one chunk, plus one layer's kernel when a quantizer is used
(``bench/load_memory.py`` measures it).

Quantization plugs in through :func:`register_quantizer`; pre-quantized checkpoints
through :func:`jpeft.models.packed.register_packed_format`. :mod:`jpeft.plugins`
registers ``"nf4"`` and bitsandbytes 4-bit checkpoints (whose packed weights load as
they are, one layer at a time) whenever anything under ``jpeft`` is imported.
:func:`save_pretrained` lives in :mod:`jpeft.models.hf_save`.
"""

from __future__ import annotations

import functools
import math
import operator
import os
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jax.typing import DTypeLike

from jpeft.models.config import LlamaConfig
from jpeft.models.hf_checkpoint import Checkpoint, hf_shape
from jpeft.models.hf_names import tensor_slots
from jpeft.models.hf_save import save_pretrained
from jpeft.models.llama import init_params
from jpeft.models.pytree import Params
from jpeft.models.safetensors_io import SafetensorsFile, check_finite

__all__ = ["QUANTIZERS", "Quantizer", "load_pretrained", "register_quantizer", "save_pretrained"]

CHUNK_BYTES = 16 * 2**20  # host staging per read

Quantizer = Callable[[jax.Array, str], Any]
"""``fn(kernel, module) -> node``: quantize ONE layer's linear kernel while loading.

* ``kernel``: a ``jax.Array [in, out]`` (our layout, HF's weight transposed) in the
  ``dtype`` passed to :func:`load_pretrained`, on the default device.
* ``module``: the HF projection name (``"q_proj"`` ... ``"down_proj"``).
* returns a weight node for that one layer: any pytree for which
  :func:`jpeft.models.linear.matmul` and :func:`jpeft.models.linear.dense` are registered. Every
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
        >>> cfg, params = load_pretrained("assets/tiny-llama", quantize="identity")
        >>> del QUANTIZERS["identity"]
    """
    QUANTIZERS[name] = fn


def load_pretrained(
    path: str | os.PathLike,
    dtype: DTypeLike = jnp.float32,
    quantize: str | Quantizer | None = None,
    allow_nonfinite: bool = False,
) -> tuple[LlamaConfig, Params]:
    """Read an HF LLaMA directory: ``config.json`` plus ``model.safetensors`` or shards.

    A pre-quantized checkpoint (``quantization_config`` in ``config.json``, e.g. a
    bitsandbytes 4-bit model) keeps its packed weights as they are: they load as
    weight nodes without requantizing.

    Args:
        path: the model directory.
        dtype: dtype of every loaded param (checkpoints in any float dtype are cast);
            packed weights keep their own storage.
        quantize: a registered :data:`Quantizer`'s name (``"nf4"``: NF4 with double
            quantization, blocksize 64) or a :data:`Quantizer` itself, applied to each layer's
            linear kernels; None to keep them dense.
        allow_nonfinite: load tensors holding NaN or Inf instead of refusing them. The
            check runs on the device, on each chunk as it is copied in.

    Raises:
        FileNotFoundError: no ``config.json`` or no safetensors weights.
        ValueError: a ``config.json`` that is not valid JSON or has values of the wrong
            type; missing, unexpected, misshaped or non-float tensors (naming file, key and
            both shapes or dtypes); a tensor holding NaN or Inf (naming file, tensor and
            the first bad index); a corrupt or truncated file (overlapping byte ranges
            included), a symlink loop; an unknown ``quantize``, an unsupported
            ``quantization_config``, ``quantize`` on a checkpoint whose weights are
            already packed.

    Example:
        >>> cfg, params = load_pretrained("assets/tiny-llama", dtype=jnp.bfloat16)
        >>> params["layers"]["self_attn"]["q_proj"]["kernel"].shape  # [L, in, out]
        (4, 128, 128)
    """
    quantizer = _quantizer(quantize)
    cfg = LlamaConfig.from_json(path)
    shapes = jax.eval_shape(lambda: init_params(jax.random.key(0), cfg))
    with Checkpoint(path) as ckpt:
        ckpt.check(cfg, shapes)
        if quantizer is not None and ckpt.packed:
            raise ValueError(
                f"{ckpt.path}: the checkpoint's linear weights are already quantized "
                f"(quantization_config in config.json); load it without quantize={quantize!r}"
            )
        return cfg, _assemble(cfg, shapes, ckpt, dtype, quantizer, allow_nonfinite)


def _quantizer(quantize: str | Quantizer | None) -> Quantizer | None:
    if quantize is None or callable(quantize):
        return quantize
    if quantize not in QUANTIZERS:
        raise ValueError(
            f"quantize={quantize!r} has no registered quantizer (registered: "
            f"{sorted(QUANTIZERS)}); register one with register_quantizer(name, fn)"
        )
    return QUANTIZERS[quantize]


def _assemble(
    cfg: LlamaConfig,
    shapes: Params,
    ckpt: Checkpoint,
    dtype: DTypeLike,
    quantizer: Quantizer | None,
    allow_nonfinite: bool,
) -> Params:
    """Copy every tensor into its preallocated entry on the device, chunk by chunk."""
    read = functools.partial(_read_into, allow_nonfinite=allow_nonfinite)
    entries: dict[tuple, jax.Array] = {}
    stacks: dict[tuple, _Stack] = {}
    for key, path, layer, transposed in tensor_slots(cfg):
        reader = ckpt.reader(key)
        shape = functools.reduce(operator.getitem, path, shapes).shape
        if key in ckpt.packed:
            stack = stacks.setdefault(path, _Stack(key, cfg.num_hidden_layers))
            stack.put(layer, ckpt.unpack(key, hf_shape(shape, layer, transposed), allow_nonfinite))
        elif quantizer is not None and layer is not None and path[-1] == "kernel":
            kernel = read(jnp.zeros(shape[1:], dtype), (), reader, key, transposed)
            stack = stacks.setdefault(path, _Stack(key, cfg.num_hidden_layers))
            stack.put(layer, quantizer(kernel, path[-2]))
        else:
            entry = entries[path] if path in entries else jnp.zeros(shape, dtype)
            index = () if layer is None else (layer,)
            entries[path] = read(entry, index, reader, key, transposed)
    entries.update((path, stack.value()) for path, stack in stacks.items())
    params: Params = {}
    for path, value in entries.items():
        _put(params, path, value)
    return params


def _read_into(
    buffer: jax.Array,
    index: tuple,
    reader: SafetensorsFile,
    key: str,
    transposed: bool,
    allow_nonfinite: bool,
) -> jax.Array:
    """``buffer[index] = tensor key`` (transposed if asked), ``CHUNK_BYTES`` of rows at a time.

    Each chunk is checked for NaN/Inf on the device, in the same kernel that copies it in;
    a bad chunk is read again on the host to name the first bad element.
    """
    shape = reader.shape(key)
    row_bytes = math.prod(shape[1:]) * reader.dtype(key).itemsize
    step = max(1, CHUNK_BYTES // max(1, row_bytes))
    for start in range(0, shape[0], step):
        stop = min(shape[0], start + step)
        chunk = reader.read(key, start, stop)
        offset = [0] * len(shape)
        offset[-1 if transposed else 0] = start  # HF rows are our columns when transposed
        buffer, finite = _fill(buffer, chunk, (*index, *offset), transposed=transposed)
        if not (allow_nonfinite or finite):
            check_finite(reader.read(key, start, stop), reader.path, key, first_row=start)
        buffer.block_until_ready()  # host staging stays at one chunk
    return buffer


class _Stack:
    """A stacked ``[L, ...]`` node entry (a quantizer's output) filled layer by layer."""

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
        pairs = zip(self.buffers, leaves, strict=True)
        self.buffers = [_fill(b, leaf, (layer,) + (0,) * leaf.ndim)[0] for b, leaf in pairs]

    def value(self) -> Any:
        return jax.tree.unflatten(self.treedef, self.buffers)


@jax.jit(static_argnames="transposed", donate_argnums=0)
def _fill(
    buffer: jax.Array, block: jax.Array, start: tuple, transposed: bool = False
) -> tuple[jax.Array, jax.Array]:
    """``buffer`` with ``block`` (transposed, cast, leading 1-axes added) written at ``start``,
    and whether ``block`` is all finite (as stored, before the cast; one fused pass)."""
    finite = jnp.isfinite(block).all()
    block = (block.T if transposed else block).astype(buffer.dtype)
    block = block.reshape((1,) * (buffer.ndim - block.ndim) + block.shape)
    return jax.lax.dynamic_update_slice(buffer, block, start), finite


def _put(tree: dict, path: tuple, value: Any) -> None:
    for part in path[:-1]:
        tree = tree.setdefault(part, {})
    tree[path[-1]] = value
