"""One call from a data file to tokenized examples."""

from __future__ import annotations

import os

from jpeft.models.tokenizer import Tokenizer
from jpeft.train.data.corpus import corpus_examples, read_documents
from jpeft.train.data.encode import Example, encode_records, fit_length
from jpeft.train.data.jsonl import read_jsonl


def load_examples(
    path: str | os.PathLike, tokenizer: Tokenizer, max_len: int, truncate: bool = False
) -> list[Example]:
    """Tokenized examples of a ``.jsonl`` instruction file or of a plain-text corpus (any
    other suffix: documents separated by blank lines, cut into ``max_len`` pieces).

    Instruction examples longer than ``max_len`` raise ValueError naming the example, unless
    ``truncate=True`` (then they keep their first ``max_len`` tokens).

    Example:
        >>> examples = load_examples("assets/data/train.jsonl", tok, max_len=256)
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"data file not found: {path!r}")
    if path.endswith(".jsonl"):
        return fit_length(encode_records(tokenizer, read_jsonl(path)), max_len, truncate)
    return corpus_examples(tokenizer, read_documents(path), max_len, source=path)
