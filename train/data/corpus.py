"""Plain-text corpora: documents separated by blank lines, cut into training sequences."""

from __future__ import annotations

import os
import re
from collections.abc import Sequence

import numpy as np

from jpeft.models.tokenizer import Tokenizer
from jpeft.train.data.encode import Example


def read_documents(path: str | os.PathLike) -> list[str]:
    """The documents of a text file: blocks separated by one or more blank lines.

    Example:
        >>> docs = read_documents("assets/data/corpus.txt")
    """
    with open(path, encoding="utf-8") as f:
        text = f.read()
    docs = [d.strip() for d in re.split(r"\n\s*\n", text)]
    docs = [d for d in docs if d]
    if not docs:
        raise ValueError(f"{os.fspath(path)}: no text (the file is empty)")
    return docs


def corpus_examples(
    tokenizer: Tokenizer, documents: Sequence[str], max_len: int, source: str = "document"
) -> list[Example]:
    """Language-modelling examples: each document becomes ``<s> text </s>``, cut into pieces of
    at most ``max_len`` tokens that overlap by one token, so that every token but the
    document's first is a target exactly once (a piece's first token is its context).

    Example:
        >>> examples = corpus_examples(tok, ["Once upon a time.", "1 + 1 = 2"], max_len=128)
    """
    if max_len < 2:
        raise ValueError(f"max_len must be at least 2, found {max_len}")
    eos = [tokenizer.eos_id] if tokenizer.eos_id is not None else []
    examples = []
    for d, ids in enumerate(tokenizer.encode_batch(list(documents), add_bos=True)):
        ids = np.array(ids + eos, dtype=np.int32)
        for start in range(0, len(ids) - 1, max_len - 1):
            piece = ids[start : start + max_len]
            mask = np.ones_like(piece)
            mask[0] = 0
            examples.append(Example(piece, mask, source=f"{source} document {d} token {start}"))
    return examples
