"""Sequence packing: lay examples one after another in rows of a fixed length."""

from __future__ import annotations

from collections.abc import Sequence

from jpeft.train.data.collate import BatchPlan


def pack_plan(
    lengths: Sequence[int],
    order: Sequence[int],
    batch_size: int,
    seq_len: int,
    drop_remainder: bool = False,
) -> list[BatchPlan]:
    """Pack examples, taken in ``order``, into rows of ``seq_len`` tokens (next fit: a row is
    closed when the next example does not fit) and group the rows into batches.

    A last partial batch is filled with empty rows, or dropped with ``drop_remainder``.
    Every length must be at most ``seq_len``.

    Example:
        >>> pack_plan([3, 4, 5], order=[0, 1, 2], batch_size=2, seq_len=8)
        [BatchPlan(length=8, rows=((0, 1), (2,)))]
    """
    rows: list[tuple[int, ...]] = []
    current: list[int] = []
    used = 0
    for i in order:
        n = lengths[i]
        if n > seq_len:
            raise ValueError(f"example {i} has {n} tokens, more than seq_len {seq_len}")
        if used + n > seq_len:
            rows.append(tuple(current))
            current, used = [], 0
        current.append(i)
        used += n
    if current:
        rows.append(tuple(current))
    return group_rows(rows, batch_size, seq_len, drop_remainder)


def group_rows(
    rows: Sequence[tuple[int, ...]], batch_size: int, length: int, drop_remainder: bool
) -> list[BatchPlan]:
    """Cut rows into batches of ``batch_size`` rows of ``length`` tokens each.

    Example:
        >>> group_rows([(0,), (1,), (2,)], batch_size=2, length=4, drop_remainder=False)
        [BatchPlan(length=4, rows=((0,), (1,))), BatchPlan(length=4, rows=((2,), ()))]
    """
    plans = []
    for start in range(0, len(rows), batch_size):
        chunk = tuple(rows[start : start + batch_size])
        if len(chunk) < batch_size:
            if drop_remainder:
                break
            chunk += ((),) * (batch_size - len(chunk))
        plans.append(BatchPlan(length, chunk))
    return plans
