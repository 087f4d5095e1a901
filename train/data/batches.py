"""Deterministic, resumable batches: shuffled by (seed, epoch), packed or length-bucketed."""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence

import numpy as np

from jpeft.train.data.bucket import bucket_plan, default_buckets
from jpeft.train.data.collate import BatchPlan, collate
from jpeft.train.data.example import Example, check_examples
from jpeft.train.data.pack import pack_plan


class BatchIterator:
    """Endless batches of ``[batch_size, seq_len]`` int32 arrays over tokenized examples.

    Each epoch visits every example once, in an order that depends only on ``seed`` and the
    epoch number. ``packing=True`` packs several examples per row (see ``collate`` for the
    ``segment_ids``/``position_ids`` it adds); ``packing=False`` pads one example per row and
    groups examples of similar length, each batch padded to its bucket length from
    ``buckets`` (default: powers of two up to ``seq_len``). A partial batch at the end of an
    epoch (or of a bucket) is filled with empty rows (zero attention and loss masks) unless
    ``drop_remainder``. Every example must fit ``seq_len`` and have a target token (else
    ValueError naming it), so no batch has an all-masked loss.

    ``state`` is a small dict ``{"epoch": e, "index": i}``: the batch that comes next is batch
    ``i`` of epoch ``e``. Save it with a checkpoint and pass it back (``state=`` or
    ``load_state``) to continue with exactly the batches an uninterrupted run would see.

    Example:
        >>> examples = [Example(np.arange(n), np.arange(n) > 1) for n in range(3, 30)]
        >>> it = BatchIterator(examples, batch_size=8, seq_len=128, seed=0)
        >>> batch = next(it)                  # dict of int32 [8, 128] arrays
        >>> batch["input_ids"].shape, it.state
        ((8, 128), {'epoch': 0, 'index': 1})
        >>> it2 = BatchIterator(examples, batch_size=8, seq_len=128, seed=0, state=it.state)
        >>> bool((next(it2)["input_ids"] == next(it)["input_ids"]).all())
        True
    """

    def __init__(
        self,
        examples: Sequence[Example],
        *,
        batch_size: int,
        seq_len: int,
        packing: bool = True,
        seed: int = 0,
        pad_id: int = 0,
        shuffle: bool = True,
        drop_remainder: bool = False,
        buckets: Sequence[int] | None = None,
        state: Mapping[str, int] | None = None,
    ) -> None:
        if batch_size < 1 or seq_len < 2:
            raise ValueError(
                f"batch_size must be >= 1 and seq_len >= 2, found {batch_size} and {seq_len}"
            )
        if not examples:
            raise ValueError("no examples to batch")
        check_examples(examples, seq_len)
        self.examples = examples
        self.batch_size, self.seq_len = batch_size, seq_len
        self.packing, self.seed, self.pad_id = packing, seed, pad_id
        self.shuffle, self.drop_remainder = shuffle, drop_remainder
        self.buckets = tuple(sorted(buckets)) if buckets else default_buckets(seq_len)
        if self.buckets[-1] > seq_len or self.buckets[0] < 1:
            raise ValueError(f"buckets must lie in [1, seq_len={seq_len}], found {self.buckets}")
        if self.buckets[-1] != seq_len:
            self.buckets = (*self.buckets, seq_len)
        self._lengths = [len(ex) for ex in examples]
        self._cache: tuple[int, list[BatchPlan]] | None = None
        if not self.plan(0):
            raise ValueError(
                f"{len(examples)} examples make no full batch of {batch_size} rows "
                "(drop_remainder=True)"
            )
        self.epoch, self.index = 0, 0
        if state is not None:
            self.load_state(state)

    def plan(self, epoch: int) -> list[BatchPlan]:
        """The batch plans of one epoch (computed once per epoch and cached).

        Example:
            >>> examples = [Example(np.arange(n), np.arange(n) > 1) for n in range(3, 30)]
            >>> it = BatchIterator(examples, batch_size=8, seq_len=32, packing=False)
            >>> sorted(p.length for p in it.plan(0))  # epoch 0: length-bucketed batches
            [16, 16, 32, 32]
        """
        if self._cache is None or self._cache[0] != epoch:
            rng = np.random.default_rng([self.seed, epoch])
            n = len(self.examples)
            order = rng.permutation(n) if self.shuffle else np.arange(n)
            if self.packing:
                plans = pack_plan(
                    self._lengths, order, self.batch_size, self.seq_len, self.drop_remainder
                )
            else:
                plans = bucket_plan(
                    self._lengths, order, self.batch_size, self.buckets, self.drop_remainder
                )
                if self.shuffle:
                    plans = [plans[j] for j in rng.permutation(len(plans))]
            self._cache = (epoch, plans)
        return self._cache[1]

    def epoch_batches(self, epoch: int = 0) -> Iterator[dict[str, np.ndarray]]:
        """All batches of one epoch, in order; does not touch ``state``. With
        ``shuffle=False`` this is one deterministic pass, as for evaluation.

        Example:
            >>> examples = [Example(np.arange(n), np.arange(n) > 1) for n in range(3, 30)]
            >>> it = BatchIterator(examples, batch_size=8, seq_len=128, shuffle=False)
            >>> [b["input_ids"].shape for b in it.epoch_batches()]
            [(8, 128)]
        """
        for p in self.plan(epoch):
            yield collate(self.examples, p, self.pad_id, self.packing)

    @property
    def state(self) -> dict[str, int]:
        """Where the iterator stands: ``{"epoch": e, "index": i}`` of the next batch."""
        return {"epoch": self.epoch, "index": self.index}

    def load_state(self, state: Mapping[str, int]) -> None:
        """Continue from a saved ``state``.

        Example:
            >>> examples = [Example(np.arange(n), np.arange(n) > 1) for n in range(3, 30)]
            >>> it = BatchIterator(examples, batch_size=2, seq_len=32)
            >>> it.load_state({"epoch": 2, "index": 3})
            >>> it.state
            {'epoch': 2, 'index': 3}
        """
        if set(state) != {"epoch", "index"}:
            raise ValueError(f"state must have keys 'epoch' and 'index', found {sorted(state)}")
        epoch, index = state["epoch"], state["index"]
        if not all(isinstance(v, int | np.integer) and v >= 0 for v in (epoch, index)):
            raise ValueError(f"state values must be non-negative integers, found {dict(state)}")
        if index > len(self.plan(int(epoch))):
            raise ValueError(
                f"state index {index} is past the {len(self.plan(int(epoch)))} batches of epoch "
                f"{epoch}; was it saved with other data or batch settings?"
            )
        self.epoch, self.index = int(epoch), int(index)

    def __iter__(self) -> BatchIterator:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        plans = self.plan(self.epoch)
        while self.index >= len(plans):  # an epoch can be empty with drop_remainder
            self.epoch, self.index = self.epoch + 1, 0
            plans = self.plan(self.epoch)
        batch = collate(self.examples, plans[self.index], self.pad_id, self.packing)
        self.index += 1
        return batch
