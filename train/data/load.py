"""One call from any data file to records."""

from __future__ import annotations

import os

from jpeft.train.data.corpus import read_documents
from jpeft.train.data.files import is_record_file, read_records
from jpeft.train.data.records import Record


def read_data(path: str | os.PathLike, format: str = "auto") -> list[Record]:
    """The records of a data file: a JSONL, JSON or Parquet file of records (see
    :func:`~jpeft.train.data.files.read_records`), or any other file as plain text whose
    documents (separated by blank lines) become text records.

    Example:
        >>> from jpeft import assets
        >>> read_data(assets.path("data/train.jsonl"))[0].kind
        'prompt-response'
        >>> read_data(assets.path("data/corpus.txt"))[0].kind
        'text'
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"data file not found: {path!r}")
    if is_record_file(path):
        return read_records(path, format)
    if format not in ("auto", "text"):
        raise ValueError(
            f"{path}: a plain-text file holds text documents, not {format} records; "
            "give a .jsonl, .json or .parquet file"
        )
    documents = read_documents(path)
    return [Record(text=d, source=f"{path} document {i}") for i, d in enumerate(documents)]
