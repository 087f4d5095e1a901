"""Ctrl-C during training: finish the current step, checkpoint, stop."""

from __future__ import annotations

import signal
import threading
from types import FrameType

import jax
import numpy as np
from jax.experimental import multihost_utils


class Interrupts:
    """Turn SIGINT into a request the loop polls between steps; a second SIGINT aborts.

    In a multi-process run every process polls together and all stop at the same step
    when any of them was interrupted.

    Example:
        >>> with Interrupts() as interrupts:
        ...     interrupts.requested()
        False
    """

    def __init__(self) -> None:
        self._flag = False
        self._previous = None

    def __enter__(self) -> Interrupts:
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self._flag:
            raise KeyboardInterrupt
        self._flag = True

    def requested(self) -> bool:
        """Whether any process got SIGINT (a collective in multi-process runs)."""
        if jax.process_count() == 1:
            return self._flag
        flags = multihost_utils.process_allgather(np.array(self._flag))
        return bool(np.any(flags))

    def __exit__(self, *exc: object) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
