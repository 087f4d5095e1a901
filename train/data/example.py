"""Tokenized examples: token ids plus the loss mask, and their length checks.

``loss_mask[t] = 1`` means token ``t`` is a target, predicted from the tokens before it: the
response tokens and the end-of-turn token after them. Prompt tokens are 0, and so is the first
token of every example (nothing precedes it).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

TOO_LONG_ADVICE = "raise the sequence length (--seq-len), or truncate it explicitly (--truncate)"
"""How to fix a record longer than the sequence length (the command line's options)."""


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
        where = _where(self)
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


def fit_length(examples: Sequence[Example], max_len: int, truncate: bool = False) -> list[Example]:
    """Check every example fits in ``max_len`` tokens (the model context); with
    ``truncate=True`` cut longer ones to their first ``max_len`` tokens instead of raising.

    A cut that leaves an example no target token raises ValueError naming it: it would
    train on nothing (an all-masked loss).

    Example:
        >>> examples = [Example(np.arange(6), np.array([0, 0, 0, 1, 1, 1]), source="d.jsonl:1")]
        >>> [len(e) for e in fit_length(examples, max_len=5, truncate=True)]
        [5]
        >>> fit_length(examples, max_len=3, truncate=True)
        Traceback (most recent call last):
        ValueError: example 0 (d.jsonl:1): truncated to 3 tokens it keeps no target token (its \
first target is token 3), so it would train on nothing; raise the sequence length or shorten \
the prompt
    """
    if max_len < 2:
        raise ValueError(f"max_len must be at least 2, found {max_len}")
    out = []
    for i, ex in enumerate(examples):
        if len(ex) > max_len:
            if not truncate:
                raise ValueError(_too_long(i, ex, max_len))
            cut = Example(ex.input_ids[:max_len], ex.loss_mask[:max_len], ex.source)
            if ex.loss_mask.any() and not cut.loss_mask.any():
                raise ValueError(
                    f"example {i}{_where(ex)}: truncated to {max_len} tokens it keeps no target "
                    f"token (its first target is token {int(np.argmax(ex.loss_mask))}), so it "
                    "would train on nothing; raise the sequence length or shorten the prompt"
                )
            ex = cut
        out.append(ex)
    return out


def check_examples(examples: Sequence[Example], max_len: int) -> None:
    """Raise ValueError naming the first example that is longer than ``max_len`` or has no
    target token (``loss_mask`` all 0: a batch of such examples has an all-masked loss).

    Example:
        >>> check_examples([Example(np.arange(3), np.zeros(3), source="d.jsonl:7")], 8)
        Traceback (most recent call last):
        ValueError: example 0 (d.jsonl:7) has no target token (its loss_mask is all 0), so it \
would train on nothing
    """
    for i, ex in enumerate(examples):
        if len(ex) > max_len:
            raise ValueError(_too_long(i, ex, max_len))
        if not ex.loss_mask.any():
            raise ValueError(
                f"example {i}{_where(ex)} has no target token (its loss_mask is all 0), so it "
                "would train on nothing"
            )


def _where(example: Example) -> str:
    return f" ({example.source})" if example.source else ""


def _too_long(index: int, example: Example, max_len: int) -> str:
    return (
        f"example {index}{_where(example)} has {len(example)} tokens, more than the maximum of "
        f"{max_len}; shorten it, {TOO_LONG_ADVICE}"
    )
