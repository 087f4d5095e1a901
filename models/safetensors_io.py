"""safetensors files: read through the ``safetensors`` library, checked, and streamed out.

Reading goes through ``safetensors.safe_open(framework="numpy")``. The library
validates the header when a file is opened: the tensors' byte ranges must tile the
data region exactly, so overlapping ranges (two tensors sharing bytes), gaps, a
truncated file or a garbled header are refused; :class:`SafetensorsFile` names the file
in that error. Row ranges are read with ``get_slice``, so a tensor streams in chunks.

* **BF16** arrives as ``ml_dtypes.bfloat16`` (safetensors >= 0.8 looks the type up in
  numpy, which knows it only once ``ml_dtypes`` is imported; this module imports it).
* **F8** and the other types numpy lacks: safetensors 0.8's numpy path cannot return
  them; :meth:`SafetensorsFile.read` raises a ``ValueError`` naming file, tensor and type.
* **Host memory.** The library memory-maps the file, and every page read stays in this
  process's resident set for as long as the mapping lives. So the mapping is dropped
  (the handle closed, reopened on the next read) after each :data:`REMAP_BYTES` read:
  streaming a model holds about one chunk of it, not the whole file. (The library's
  ``backend="pread"`` would not help: its ``get_slice`` reads the whole tensor.)

Loaded values are checked by :func:`check_finite` (NaN or Inf refused, naming the
tensor) and :func:`read_weights` (an adapter's tensors: floating point and finite).

Writing: :func:`write_file` is hand-written because ``safetensors.numpy.save_file``
needs every tensor of the file in host memory at once (a 5 GB shard of a merged
model), while :func:`write_file` writes the header first and then produces one tensor
at a time. Small files (an adapter) go through ``safetensors.numpy.save_file``.
"""

from __future__ import annotations

import json
import math
import os
import struct
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import ml_dtypes
import numpy as np
import safetensors
from safetensors import SafetensorError, safe_open

from jpeft.models.files import require_file

DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype("<f8"),
    "F32": np.dtype("<f4"),
    "F16": np.dtype("<f2"),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
    "I64": np.dtype("<i8"),
    "I32": np.dtype("<i4"),
    "I16": np.dtype("<i2"),
    "I8": np.dtype("i1"),
    "U64": np.dtype("<u8"),
    "U32": np.dtype("<u4"),
    "U16": np.dtype("<u2"),
    "U8": np.dtype("u1"),
    "BOOL": np.dtype("?"),
}
"""safetensors dtype codes and their numpy dtypes (``ml_dtypes`` for BF16 and F8)."""

FLOATS = frozenset(DTYPES[code] for code in ("F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2"))
"""The floating-point dtypes (``ml_dtypes``' are not ``np.floating`` subtypes)."""

REMAP_BYTES = 16 * 2**20
"""Bytes read through one memory mapping before it is dropped (see the module docstring)."""

_CODES = {dtype: code for code, dtype in DTYPES.items()}


class SafetensorsFile:
    """Random access to the tensors of one ``.safetensors`` file (header validated on open).

    Raises:
        FileNotFoundError, ValueError: no readable file at ``path``, as
            :func:`jpeft.models.files.require_file`.
        ValueError: the library refuses the file (corrupt or truncated header, byte
            ranges that overlap, leave gaps or run past the end), naming ``path``.

    Example:
        >>> import tempfile
        >>> from safetensors.numpy import save_file
        >>> path = os.path.join(tempfile.mkdtemp(), "model.safetensors")
        >>> save_file({"norm": np.arange(6, dtype=ml_dtypes.bfloat16).reshape(3, 2)}, path)
        >>> with SafetensorsFile(path) as f:
        ...     f.shape("norm"), f.dtype("norm"), f.read("norm", 1, 3).tolist()
        ((3, 2), dtype(bfloat16), [[2.0, 3.0], [4.0, 5.0]])
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = require_file(path)
        self._handle: Any = None
        self._mapped = 0  # bytes read through the current handle
        handle = self._open()
        self.metadata: dict[str, str] = handle.metadata() or {}
        self._entries: dict[str, tuple[tuple[int, ...], str]] = {}
        for key in handle.offset_keys():
            view = handle.get_slice(key)
            self._entries[key] = (tuple(view.get_shape()), view.get_dtype())

    def __enter__(self) -> SafetensorsFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Drop the memory mapping (a later :meth:`read` opens the file again)."""
        if self._handle is not None:
            self._handle.__exit__(None, None, None)
            self._handle = None
        self._mapped = 0

    def keys(self) -> list[str]:
        """Tensor names in the file, in the order of their bytes."""
        return list(self._entries)

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __contains__(self, key: str) -> bool:
        return key in self._entries

    def shape(self, key: str) -> tuple[int, ...]:
        """Shape of tensor ``key``."""
        return self._entries[key][0]

    def dtype(self, key: str) -> np.dtype:
        """numpy dtype of tensor ``key`` (``ml_dtypes.bfloat16`` for BF16).

        Raises:
            ValueError: a type with no numpy dtype (F4, F8_E8M0...), naming the tensor.
        """
        code = self._entries[key][1]
        if code not in DTYPES:
            raise ValueError(
                f"{self.path}: tensor {key!r} has type {code}, which jpeft cannot read"
            )
        return DTYPES[code]

    def read(self, key: str, start: int = 0, stop: int | None = None) -> np.ndarray:
        """Rows ``[start, stop)`` (along axis 0) of tensor ``key`` as a fresh array.

        Only those rows' bytes are read; the default is the whole tensor.

        Raises:
            ValueError: rows out of range, or a type the library cannot return in numpy.
        """
        shape, code = self._entries[key]
        rows = shape[0] if shape else 1
        stop = rows if stop is None else stop
        if not 0 <= start <= stop <= rows:
            raise ValueError(f"{self.path}: rows [{start}, {stop}) of {key!r} {list(shape)}")
        if start == stop or 0 in shape:  # the library refuses empty slices
            return np.empty((stop - start, *shape[1:]), self.dtype(key))
        try:
            view = self._open().get_slice(key)
            array = view[start:stop] if shape else view[...]
        except (SafetensorError, AttributeError, TypeError) as e:
            raise ValueError(
                f"{self.path}: cannot read tensor {key!r} of type {code} through "
                f"safetensors {safetensors.__version__} ({e})"
            ) from e
        self._mapped += array.nbytes
        if self._mapped >= REMAP_BYTES:
            self.close()
        return array

    def _open(self) -> Any:
        if self._handle is None:
            try:
                handle = safe_open(self.path, framework="numpy")
                self._handle = handle.__enter__()
            except SafetensorError as e:
                raise ValueError(f"{self.path}: corrupt or truncated safetensors file ({e})") from e
        return self._handle


def is_float(dtype: np.dtype) -> bool:
    """Whether ``dtype`` is a floating-point dtype, ``ml_dtypes``' included.

    Example:
        >>> is_float(np.dtype(ml_dtypes.bfloat16)), is_float(np.dtype(np.int32))
        (True, False)
    """
    return np.dtype(dtype) in FLOATS


def check_finite(array: np.ndarray, path: str, key: str, first_row: int = 0) -> None:
    """Raise ``ValueError`` naming ``path`` and ``key`` when ``array`` holds NaN or Inf.

    ``array`` is the tensor, or its rows from ``first_row`` on (the error gives the first
    bad element's index in the whole tensor). Arrays of other than float dtypes pass.

    Example:
        >>> check_finite(np.array([1.0, np.nan, np.inf]), "a.safetensors", "lora_A")
        ... # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        ValueError: a.safetensors: tensor 'lora_A' holds non-finite values (1 NaN, 1 Inf; ...
    """
    if not is_float(array.dtype):
        return
    finite = np.isfinite(array)
    if finite.all():
        return
    nan = int(np.isnan(array).sum())
    first = [int(i) for i in np.unravel_index(int(np.argmin(finite)), array.shape)]
    if first:
        first[0] += first_row
    raise ValueError(
        f"{path}: tensor {key!r} holds non-finite values ({nan} NaN, "
        f"{int(finite.size - finite.sum()) - nan} Inf; the first at index {first}); "
        "refusing to load it (pass allow_nonfinite=True to load it anyway)"
    )


def read_weights(path: str | os.PathLike, allow_nonfinite: bool = False) -> dict[str, np.ndarray]:
    """Every tensor of a weights file (a peft adapter's), checked: floating point and finite.

    An integer tensor where a weight belongs would be cast to float and silently
    change what the adapter does, so it is refused.

    Args:
        path: the ``.safetensors`` file.
        allow_nonfinite: load tensors holding NaN or Inf instead of refusing them.

    Raises:
        FileNotFoundError, ValueError: as :class:`SafetensorsFile`; a tensor that is not
            floating point, or holds NaN/Inf (unless ``allow_nonfinite``), naming it.

    Example:
        >>> import tempfile
        >>> from safetensors.numpy import save_file
        >>> path = os.path.join(tempfile.mkdtemp(), "adapter_model.safetensors")
        >>> save_file({"lora_A.weight": np.arange(4, dtype=np.int32)}, path)
        >>> read_weights(path)  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        ValueError: ...: tensor 'lora_A.weight' has dtype int32; expected a floating-point weight
    """
    with SafetensorsFile(path) as f:
        tensors = {}
        for key in f:
            if not is_float(f.dtype(key)):
                raise ValueError(
                    f"{f.path}: tensor {key!r} has dtype {f.dtype(key)}; "
                    "expected a floating-point weight"
                )
            tensors[key] = f.read(key)
            if not allow_nonfinite:
                check_finite(tensors[key], f.path, key)
    return tensors


def write_file(
    path: str | os.PathLike,
    specs: Iterable[tuple[str, tuple[int, ...], np.dtype]],
    produce: Callable[[str], np.ndarray],
    metadata: dict[str, str] | None = None,
) -> int:
    """Write the tensors ``specs`` announces, calling ``produce(key)`` for one at a time.

    Hand-written because the library cannot do this: ``safetensors.numpy.save_file``
    takes a dict of every tensor of the file, so a 5 GB shard of a merged model would
    sit in host memory whole; here only one tensor does.

    ``specs`` lists ``(key, shape, dtype)`` up front so the header is written before any
    tensor is materialized; the tensors are laid out in that order, back to back, as the
    format requires. Returns the number of data bytes. Write through
    :func:`jpeft.models.atomic.atomic_path` for an atomic, durable file.

    Raises:
        ValueError: a dtype safetensors has no code for, or a produced tensor whose
            shape or dtype differs from its spec.

    Example:
        >>> import tempfile
        >>> path = os.path.join(tempfile.mkdtemp(), "a.safetensors")
        >>> a = np.ones((2, 3), np.float32)
        >>> write_file(path, [("a", a.shape, a.dtype)], lambda key: a)
        24
        >>> SafetensorsFile(path).read("a").shape
        (2, 3)
    """
    specs = list(specs)
    header: dict[str, Any] = {"__metadata__": metadata or {"format": "pt"}}
    offset = 0
    for key, shape, dtype in specs:
        nbytes = math.prod(shape) * np.dtype(dtype).itemsize
        header[key] = {
            "dtype": _code(key, dtype),
            "shape": list(shape),
            "data_offsets": [offset, offset + nbytes],
        }
        offset += nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)) + blob)
        for key, shape, dtype in specs:
            array = produce(key)
            if array.shape != tuple(shape) or array.dtype != np.dtype(dtype):
                raise ValueError(
                    f"{path}: tensor {key!r} is {array.shape} {array.dtype}, "
                    f"announced {tuple(shape)} {np.dtype(dtype)}"
                )
            little_endian = np.ascontiguousarray(array, DTYPES[header[key]["dtype"]])
            f.write(little_endian.reshape(-1).view(np.uint8))
    return offset


def _code(key: str, dtype: np.dtype) -> str:
    dtype = np.dtype(dtype)
    if dtype not in _CODES:
        raise ValueError(f"tensor {key!r}: dtype {dtype} cannot be stored in safetensors")
    return _CODES[dtype]
