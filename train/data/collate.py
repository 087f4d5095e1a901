"""Batch plans (which example goes in which row) and turning a plan into numpy arrays."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from jpeft.train.data.example import Example


@dataclasses.dataclass(frozen=True)
class BatchPlan:
    """One batch: its length ``T`` and, per row, the indices of the examples laid in it one
    after another. An empty row is padding that keeps the batch size fixed.

    Example:
        >>> plan = BatchPlan(length=8, rows=((0, 2), (1,), ()))   # B=3, T=8; row 0 packs two
        >>> len(plan.rows), plan.length
        (3, 8)
    """

    length: int
    rows: tuple[tuple[int, ...], ...]


def collate(
    examples: Sequence[Example], plan: BatchPlan, pad_id: int = 0, packed: bool = True
) -> dict[str, np.ndarray]:
    """The int32 ``[B, T]`` arrays of one batch.

    Always ``input_ids`` (``pad_id`` after the last example of a row), ``attention_mask``
    (1 on real tokens) and ``loss_mask``; with ``packed=True`` also ``segment_ids`` (1..k for
    the k examples of a row, 0 on padding) and ``position_ids`` (restarting at 0 in every
    segment), from which the model builds a block-diagonal causal mask.

    Example:
        >>> examples = [Example(np.arange(3), [0, 1, 1]), Example(np.arange(4), [0, 0, 1, 1])]
        >>> batch = collate(examples, BatchPlan(8, ((0, 1),)), pad_id=3)
        >>> batch["segment_ids"].tolist(), batch["position_ids"].tolist()
        ([[1, 1, 1, 2, 2, 2, 2, 0]], [[0, 1, 2, 0, 1, 2, 3, 0]])
    """
    shape = (len(plan.rows), plan.length)
    input_ids = np.full(shape, pad_id, dtype=np.int32)
    loss_mask = np.zeros(shape, dtype=np.int32)
    segment_ids = np.zeros(shape, dtype=np.int32)
    position_ids = np.zeros(shape, dtype=np.int32)
    for r, row in enumerate(plan.rows):
        t = 0
        for k, i in enumerate(row, start=1):
            ex = examples[i]
            n = len(ex)
            if t + n > plan.length:
                raise ValueError(
                    f"row {r} of the plan does not fit: example {i} ends at {t + n} > {plan.length}"
                )
            input_ids[r, t : t + n] = ex.input_ids
            loss_mask[r, t : t + n] = ex.loss_mask
            segment_ids[r, t : t + n] = k
            position_ids[r, t : t + n] = np.arange(n, dtype=np.int32)
            t += n
    batch = {
        "input_ids": input_ids,
        "attention_mask": (segment_ids > 0).astype(np.int32),
        "loss_mask": loss_mask,
    }
    if packed:
        batch["segment_ids"] = segment_ids
        batch["position_ids"] = position_ids
    return batch
