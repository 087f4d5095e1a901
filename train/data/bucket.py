"""Padding with length buckets: one example per row, batches of similar lengths."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from jpeft.train.data.collate import BatchPlan
from jpeft.train.data.pack import group_rows


def default_buckets(seq_len: int, smallest: int = 16) -> tuple[int, ...]:
    """Powers of two from ``smallest`` below ``seq_len``, then ``seq_len``: few distinct
    shapes, so few recompilations under ``jax.jit``.

    Example:
        >>> default_buckets(100)
        (16, 32, 64, 100)
    """
    lengths = []
    b = smallest
    while b < seq_len:
        lengths.append(b)
        b *= 2
    return (*lengths, seq_len)


def bucket_plan(
    lengths: Sequence[int],
    order: Sequence[int],
    batch_size: int,
    buckets: Sequence[int],
    drop_remainder: bool = False,
) -> list[BatchPlan]:
    """Give each example (taken in ``order``) the shortest bucket length that holds it and
    batch the examples of each bucket together, padded to that length.

    Batches come bucket by bucket (shortest first); shuffle the list for training. A last
    partial batch of a bucket is filled with empty rows, or dropped with ``drop_remainder``.

    Example:
        >>> bucket_plan([5, 20, 6], order=[0, 1, 2], batch_size=2, buckets=(8, 32))
        [BatchPlan(length=8, rows=((0,), (2,))), BatchPlan(length=32, rows=((1,), ()))]
    """
    buckets = sorted(buckets)
    members: list[list[tuple[int, ...]]] = [[] for _ in buckets]
    for i in order:
        b = int(np.searchsorted(buckets, lengths[i]))
        if b == len(buckets):
            raise ValueError(f"example {i} has {lengths[i]} tokens, more than {buckets[-1]}")
        members[b].append((i,))
    plans = []
    for length, rows in zip(buckets, members, strict=True):
        plans += group_rows(rows, batch_size, length, drop_remainder)
    return plans
