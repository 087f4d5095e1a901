"""Plain-text corpora: documents separated by blank lines, cut into training sequences."""

from __future__ import annotations

import os
import re
from collections.abc import Sequence

import numpy as np

from jpeft.models.tokenizer import Tokenizer
from jpeft.train.data.example import Example


def read_documents(path: str | os.PathLike) -> list[str]:
    """The documents of a text file: blocks separated by one or more blank lines.

    Example:
        >>> from jpeft import assets
        >>> len(read_documents(assets.path("data/corpus.txt"))) > 5000
        True
    """
    with open(path, encoding="utf-8") as f:
        text = f.read()
    docs = [d.strip() for d in re.split(r"\n\s*\n", text)]
    docs = [d for d in docs if d]
    if not docs:
        raise ValueError(f"{os.fspath(path)}: no text (the file is empty)")
    return docs


def corpus_examples(
    tokenizer: Tokenizer,
    documents: Sequence[str],
    max_len: int,
    source: str = "",
    sources: Sequence[str] | None = None,
) -> list[Example]:
    """Language-modelling examples: each document is tokenized as transformers'
    ``tokenizer(text)`` does (BOS as an id), then EOS, and cut into pieces of at most
    ``max_len`` tokens that overlap by one token, so that every token but the document's
    first is a target exactly once (a piece's first token is its context).

    Each piece's ``source`` is ``"{source} document {d} token {start}"`` (``source``: the
    file), or ``"{sources[d]} token {start}"`` when ``sources`` names each document.

    Example:
        >>> from jpeft import assets
        >>> tok = Tokenizer.from_dir(assets.path("tiny-llama"))
        >>> examples = corpus_examples(tok, ["Once upon a time.", "1 + 1 = 2"], max_len=4)
        >>> [e.source for e in examples][:3]
        ['document 0 token 0', 'document 0 token 3', 'document 1 token 0']
    """
    if max_len < 2:
        raise ValueError(f"max_len must be at least 2, found {max_len}")
    if sources is not None and len(sources) != len(documents):
        raise ValueError(f"{len(sources)} sources for {len(documents)} documents")
    eos = tokenizer.eos_id
    examples = []
    for d, ids in enumerate(tokenizer.encode_batch(list(documents))):
        if eos is not None and ids[-1:] != [eos]:  # (unless the post-processor added it)
            ids = [*ids, eos]
        ids = np.array(ids, dtype=np.int32)
        name = sources[d] if sources is not None else f"{source} document {d}".lstrip()
        for start in range(0, len(ids) - 1, max_len - 1):
            piece = ids[start : start + max_len]
            mask = np.ones_like(piece)
            mask[0] = 0
            examples.append(Example(piece, mask, source=f"{name} token {start}"))
    return examples
