"""A held-out eval split that is deterministic and disjoint in content."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from jpeft.train.data.records import Record


def split_eval(
    records: Sequence[Record], fraction: float, seed: int = 0
) -> tuple[list[Record], list[Record]]:
    """Split records into (train, eval) with about ``fraction`` of them in eval.

    Records with equal content (``Record.key``) always land on the same side, so no eval
    example is also a training example. The choice depends only on the records and ``seed``;
    both parts keep the input order.

    Example:
        >>> records = [Record(prompt=f"q{i % 15}", response="a") for i in range(20)]
        >>> train, held_out = split_eval(records, fraction=0.1, seed=0)
        >>> len(train) + len(held_out), {r.key() for r in train} & {r.key() for r in held_out}
        (20, set())
    """
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"eval fraction must be in (0, 1), found {fraction}")
    groups: dict[str, list[int]] = {}
    for i, r in enumerate(records):
        groups.setdefault(r.key(), []).append(i)
    if len(groups) < 2:
        raise ValueError(f"need at least 2 distinct records to split, found {len(groups)}")
    keys = list(groups)
    target = max(1, round(fraction * len(records)))
    in_eval = np.zeros(len(records), dtype=bool)
    taken = 0
    for g in np.random.default_rng(seed).permutation(len(keys)):
        if taken >= target or taken + len(groups[keys[g]]) >= len(records):
            break
        in_eval[groups[keys[g]]] = True
        taken += len(groups[keys[g]])
    train = [r for r, e in zip(records, in_eval, strict=True) if not e]
    held_out = [r for r, e in zip(records, in_eval, strict=True) if e]
    return train, held_out
