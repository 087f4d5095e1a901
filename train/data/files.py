"""Data files: JSONL, JSON arrays and Parquet tables of records.

Every record keeps where it came from (``source``): ``"file.jsonl:12"`` (1-based line),
``"file.json[3]"`` (0-based array index) or ``"file.parquet row 3"`` (0-based row). A bad
record raises ValueError naming that place and what is wrong; blank JSONL lines are skipped.
Parquet needs ``pyarrow`` (``pip install 'jpeft[parquet]'``).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from typing import Any

from jpeft.train.data.formats import parse_record
from jpeft.train.data.records import Record

RECORD_SUFFIXES = (".jsonl", ".json", ".parquet")


def is_record_file(path: str | os.PathLike) -> bool:
    """True for a file of records (JSONL, JSON, Parquet); other files are plain text.

    Example:
        >>> is_record_file("train.parquet"), is_record_file("corpus.txt")
        (True, False)
    """
    return os.fspath(path).endswith(RECORD_SUFFIXES)


def _jsonl_rows(path: str) -> Iterator[tuple[str, Any]]:
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                yield where, json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{where}: invalid JSON ({e.msg} at column {e.colno})") from e


def _json_rows(path: str) -> Iterator[tuple[str, Any]]:
    with open(path, encoding="utf-8") as f:
        try:
            rows = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(
                f"{path}: invalid JSON ({e.msg} at line {e.lineno} column {e.colno})"
            ) from e
    if not isinstance(rows, list):
        raise ValueError(f"{path}: expected a JSON array of records, found {type(rows).__name__}")
    for i, row in enumerate(rows):
        yield f"{path}[{i}]", row


def _parquet_rows(path: str) -> Iterator[tuple[str, Any]]:
    try:
        import pyarrow.parquet as pq
    except ImportError as e:
        raise ValueError(
            f"{path}: reading Parquet needs pyarrow, which is not installed; "
            "pip install 'jpeft[parquet]' (or convert the file to JSONL)"
        ) from e
    try:
        table = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises ArrowInvalid/OSError subclasses for bad files
        raise ValueError(f"{path}: not a valid Parquet file ({e})") from e
    row = 0
    for batch in table.iter_batches(batch_size=1024):
        for obj in batch.to_pylist():
            yield f"{path} row {row}", obj
            row += 1


def iter_records(path: str | os.PathLike, format: str = "auto") -> Iterator[Record]:
    """Yield the validated records of a JSONL, JSON or Parquet file.

    ``format`` is a name of :data:`jpeft.train.data.formats.FORMATS`, or ``"auto"`` to
    detect each record's format from its keys.

    Example:
        >>> from jpeft import assets
        >>> next(iter_records(assets.path("data/train.jsonl"))).kind
        'prompt-response'
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"data file not found: {path!r}")
    if path.endswith(".parquet"):
        rows = _parquet_rows(path)
    elif path.endswith(".json"):
        rows = _json_rows(path)
    else:
        rows = _jsonl_rows(path)
    for where, obj in rows:
        try:
            yield parse_record(obj, format, source=where)
        except ValueError as e:
            raise ValueError(f"{where}: {e}") from e


def read_records(path: str | os.PathLike, format: str = "auto") -> list[Record]:
    """All records of a data file (see :func:`iter_records`); raises ValueError at the first
    bad record, or when the file has none.

    Example:
        >>> from jpeft import assets
        >>> len(read_records(assets.path("data/eval.jsonl")))
        200
    """
    records = list(iter_records(path, format))
    if not records:
        raise ValueError(f"{os.fspath(path)}: no records (the file is empty)")
    return records
