"""Minimal safetensors reader and writer that stream one tensor at a time.

The format: 8 bytes little-endian header length ``N``, ``N`` bytes of JSON
``{key: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}}``
(space-padded to a multiple of 8), then the raw little-endian tensor bytes.

Why not ``safetensors.numpy``: it cannot read or write bfloat16 (numpy has no such
dtype; ``ml_dtypes`` provides it), and the errors here name the file and key.
"""

from __future__ import annotations

import json
import math
import os
import struct
from collections.abc import Callable, Iterable
from typing import Any, BinaryIO

import ml_dtypes
import numpy as np

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
    "U8": np.dtype("u1"),
    "BOOL": np.dtype("?"),
}
_CODES = {dtype: code for code, dtype in DTYPES.items()}
_MAX_HEADER = 100_000_000


class SafetensorsFile:
    """Random access to the tensors of one ``.safetensors`` file (header validated on open).

    Example:
        >>> with SafetensorsFile("model.safetensors") as f:  # doctest: +SKIP
        ...     f.shape("model.norm.weight"), f.read("model.norm.weight").dtype
        ((4096,), dtype('float32'))
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = os.fspath(path)
        self._file: BinaryIO = open(self.path, "rb")  # noqa: SIM115 (closed in close())
        try:
            self._entries, self.metadata, self._data_start = _read_header(self._file, self.path)
        except BaseException:
            self._file.close()
            raise

    def __enter__(self) -> SafetensorsFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the underlying file."""
        self._file.close()

    def keys(self) -> list[str]:
        """Tensor names in the file."""
        return list(self._entries)

    def __contains__(self, key: str) -> bool:
        return key in self._entries

    def shape(self, key: str) -> tuple[int, ...]:
        """Shape of tensor ``key``."""
        return tuple(self._entries[key]["shape"])

    def dtype(self, key: str) -> np.dtype:
        """numpy dtype of tensor ``key`` (``ml_dtypes.bfloat16`` for BF16)."""
        return DTYPES[self._entries[key]["dtype"]]

    def read(self, key: str, start: int = 0, stop: int | None = None) -> np.ndarray:
        """Read rows ``[start, stop)`` (along axis 0) of tensor ``key`` into a fresh array.

        Only those rows' bytes are read; the default is the whole tensor.
        """
        entry = self._entries[key]
        shape = entry["shape"]
        dtype = DTYPES[entry["dtype"]]
        rows = shape[0] if shape else 1
        stop = rows if stop is None else stop
        if not 0 <= start <= stop <= rows:
            raise ValueError(f"{self.path}: rows [{start}, {stop}) of {key!r} {shape}")
        row_bytes = math.prod(shape[1:]) * dtype.itemsize
        buf = np.empty((stop - start) * row_bytes, np.uint8)
        self._file.seek(self._data_start + entry["data_offsets"][0] + start * row_bytes)
        if self._file.readinto(memoryview(buf)) != buf.size:
            raise ValueError(f"{self.path}: file ended while reading tensor {key!r}")
        return buf.view(dtype).reshape([stop - start, *shape[1:]] if shape else [])


def _read_header(f: BinaryIO, path: str) -> tuple[dict[str, Any], dict[str, str], int]:
    size = os.fstat(f.fileno()).st_size
    prefix = f.read(8)
    if len(prefix) < 8:
        raise ValueError(f"{path}: not a safetensors file ({size} bytes, no header)")
    (n,) = struct.unpack("<Q", prefix)
    if n > min(_MAX_HEADER, size - 8):
        raise ValueError(f"{path}: corrupt safetensors header (length {n}, file {size} bytes)")
    try:
        header = json.loads(f.read(n))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: corrupt safetensors header ({e})") from e
    if not isinstance(header, dict):
        raise ValueError(f"{path}: corrupt safetensors header (not a JSON object)")
    metadata = header.pop("__metadata__", None) or {}
    data_size = size - 8 - n
    for key, entry in header.items():
        _check_entry(path, key, entry, data_size)
    return header, metadata, 8 + n


def _check_entry(path: str, key: str, entry: Any, data_size: int) -> None:
    try:
        dtype = DTYPES[entry["dtype"]]
        shape = [int(d) for d in entry["shape"]]
        begin, end = (int(o) for o in entry["data_offsets"])
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{path}: corrupt header entry for tensor {key!r}: {entry!r}") from e
    if end - begin != math.prod(shape) * dtype.itemsize or begin < 0:
        raise ValueError(
            f"{path}: tensor {key!r} has shape {shape} {entry['dtype']} but data_offsets "
            f"[{begin}, {end}] span {end - begin} bytes"
        )
    if end > data_size:
        raise ValueError(
            f"{path}: truncated: tensor {key!r} needs data bytes [{begin}, {end}] "
            f"but the file holds only {data_size}"
        )


def write_file(
    path: str | os.PathLike,
    specs: Iterable[tuple[str, tuple[int, ...], np.dtype]],
    produce: Callable[[str], np.ndarray],
    metadata: dict[str, str] | None = None,
) -> int:
    """Write the tensors ``specs`` announces, calling ``produce(key)`` for one at a time.

    ``specs`` lists ``(key, shape, dtype)`` up front so the header is written before
    any tensor is materialized. Returns the number of data bytes.

    Example:
        >>> a = np.ones((2, 3), np.float32)
        >>> write_file("/tmp/a.safetensors", [("a", a.shape, a.dtype)], lambda key: a)
        24
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
