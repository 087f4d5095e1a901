"""Tokenized examples: token ids plus the loss mask, and their length checks.

``loss_mask[t] = 1`` means token ``t`` is a target, predicted from the tokens before it: the
response tokens and the end-of-turn token after them. Prompt tokens are 0, and so is the first
token of every example (nothing precedes it).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from jpeft.models.tokenizer import Tokenizer
from jpeft.train.data.jsonl import Record
from jpeft.train.data.templates import Chunk, record_chunks


@dataclasses.dataclass(frozen=True, eq=False)
class Example:
    """One tokenized example: int32 ``input_ids`` and ``loss_mask`` of the same length.

    Example:
        >>> ex = Example(np.array([1, 7, 8, 2]), np.array([0, 0, 1, 1]), source="a.jsonl:3")
        >>> len(ex)
        4
    """

    input_ids: np.ndarray
    loss_mask: np.ndarray
    source: str = ""

    def __post_init__(self) -> None:
        ids = np.asarray(self.input_ids, dtype=np.int32)
        mask = np.asarray(self.loss_mask, dtype=np.int32)
        where = f" ({self.source})" if self.source else ""
        if ids.ndim != 1 or ids.shape != mask.shape:
            raise ValueError(
                f"example{where}: input_ids and loss_mask must be 1-D of one length, found "
                f"shapes {ids.shape} and {mask.shape}"
            )
        if ids.size == 0:
            raise ValueError(f"example{where} has no tokens")
        if mask[0] != 0:
            raise ValueError(f"example{where}: loss_mask[0] must be 0 (no token precedes it)")
        object.__setattr__(self, "input_ids", ids)
        object.__setattr__(self, "loss_mask", mask)

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])


def encode_chunks(tokenizer: Tokenizer, chunks: Sequence[Chunk]) -> tuple[list[int], list[int]]:
    """Tokenize each chunk on its own and concatenate: (ids, loss mask).

    Example:
        >>> encode_chunks(tok, [("<s>Q:", False), (" A</s>", True)])
        ([1, ..., 2], [0, ..., 1])
    """
    ids: list[int] = []
    mask: list[int] = []
    for text, is_target in chunks:
        piece = tokenizer.encode(text, add_bos=False)
        ids += piece
        mask += [int(is_target)] * len(piece)
    if mask:
        mask[0] = 0
    return ids, mask


def encode_record(tokenizer: Tokenizer, record: Record) -> Example:
    """Tokenize one record (see ``templates`` for how it is rendered).

    Example:
        >>> ex = encode_record(tok, Record(prompt="Sort: 3 1", response="1 3"))
    """
    ids, mask = encode_chunks(tokenizer, record_chunks(tokenizer, record))
    if not any(mask):
        raise ValueError(f"{record.source or 'record'}: the response renders to no tokens")
    return Example(np.array(ids), np.array(mask), source=record.source)


def encode_records(tokenizer: Tokenizer, records: Sequence[Record]) -> list[Example]:
    """``encode_record`` for each record.

    Example:
        >>> examples = encode_records(tok, read_jsonl("assets/data/train.jsonl"))
    """
    return [encode_record(tokenizer, r) for r in records]


def generation_prompt(tokenizer: Tokenizer, record: Record) -> list[int]:
    """Token ids a model continues to produce the record's (last) response: every token
    before the last target chunk, tokenized exactly as in training.

    Example:
        >>> ids = generation_prompt(tok, Record(prompt="Sort: 3 1", response="1 3"))
        >>> tok.decode(ids, skip_special=False)
        '<s>[INST] Sort: 3 1 [/INST]'
    """
    chunks = record_chunks(tokenizer, record)
    last = max(i for i, (_, is_target) in enumerate(chunks) if is_target)
    return encode_chunks(tokenizer, chunks[:last])[0]


def fit_length(examples: Sequence[Example], max_len: int, truncate: bool = False) -> list[Example]:
    """Check every example fits in ``max_len`` tokens (the model context); with
    ``truncate=True`` cut longer ones to their first ``max_len`` tokens instead of raising.

    Example:
        >>> examples = fit_length(examples, max_len=256)
    """
    if max_len < 2:
        raise ValueError(f"max_len must be at least 2, found {max_len}")
    out = []
    for i, ex in enumerate(examples):
        if len(ex) > max_len:
            if not truncate:
                raise ValueError(too_long_message(i, ex, max_len))
            ex = Example(ex.input_ids[:max_len], ex.loss_mask[:max_len], ex.source)
        out.append(ex)
    return out


def too_long_message(index: int, example: Example, max_len: int) -> str:
    """The error for an example longer than the context (shared by the batchers)."""
    where = f" ({example.source})" if example.source else ""
    return (
        f"example {index}{where} has {len(example)} tokens, more than the maximum of "
        f"{max_len}; shorten it, raise the sequence length, or truncate it explicitly"
    )
