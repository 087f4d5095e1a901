"""Batches built ahead on a background thread, so the device never waits for the host.

The thread takes batches from a :class:`jpeft.train.data.BatchIterator` in order and
puts each on the device (``place``) while the device runs earlier steps. Each item
carries the iterator's position after its batch, so a checkpoint saved after step k
records exactly where batch k+1 starts, however far the thread has run ahead.
"""

from __future__ import annotations

import dataclasses
import queue
import threading
from collections.abc import Callable
from typing import Any

import numpy as np

from jpeft.train.data import BatchIterator

_DONE = object()


@dataclasses.dataclass(frozen=True)
class Prefetched:
    """One batch ready for a step: ``batch`` (placed), ``position`` (the iterator's state
    after it) and ``tokens`` (its count of real, non-padding tokens)."""

    batch: Any
    position: dict[str, int]
    tokens: int


class Prefetcher:
    """Iterate :class:`Prefetched` batches of ``batches``, ``depth`` of them built ahead.

    Close it (or use it as a context manager) before touching ``batches`` again.

    Example:
        >>> from jpeft.train.data import Example
        >>> examples = [Example([1, 2, 3], [0, 1, 1])] * 4
        >>> it = BatchIterator(examples, batch_size=2, seq_len=4, seed=0)
        >>> with Prefetcher(it, place=lambda b: b) as ahead:
        ...     item = next(ahead)
        >>> item.position, item.tokens
        ({'epoch': 0, 'index': 1}, 6)
    """

    def __init__(
        self, batches: BatchIterator, place: Callable[[dict[str, np.ndarray]], Any], depth: int = 2
    ) -> None:
        self._batches, self._place = batches, place
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._fill, name="jpeft-prefetch", daemon=True)
        self._thread.start()

    def _fill(self) -> None:
        try:
            while not self._stop.is_set():
                batch = next(self._batches)
                tokens = int(np.sum(batch["attention_mask"]))
                item = Prefetched(self._place(batch), self._batches.state, tokens)
                while not self._stop.is_set():
                    try:
                        self._queue.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
        except BaseException as err:  # handed to the consumer, raised there
            self._queue.put(err)
        else:
            self._queue.put(_DONE)

    def __iter__(self) -> Prefetcher:
        return self

    def __next__(self) -> Prefetched:
        item = self._queue.get()
        if isinstance(item, BaseException):
            raise item
        if item is _DONE:
            raise StopIteration
        return item

    def close(self) -> None:
        """Stop the thread and drop the batches built ahead."""
        self._stop.set()
        while self._thread.is_alive():
            try:
                self._queue.get(timeout=0.1)
            except queue.Empty:
                continue
        self._thread.join()

    def __enter__(self) -> Prefetcher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
