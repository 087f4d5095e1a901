"""Ctrl-C (SIGINT) and SIGTERM during training: finish the current step, checkpoint, stop.

SIGTERM is what SLURM, Kubernetes and preemptible cloud machines send before they kill a
job, so it is handled exactly like Ctrl-C: the loop saves a checkpoint and exits with
its own status (143 = 128 + SIGTERM, 130 for Ctrl-C) and a line saying how to resume.
"""

from __future__ import annotations

import signal
import threading
from types import FrameType

import jax
import numpy as np
from jax.experimental import multihost_utils

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Interrupts:
    """Turn SIGINT and SIGTERM into a request the loop polls between steps; a second
    Ctrl-C aborts at once.

    In a multi-process run every process polls together (:meth:`requested`, a
    collective) and all stop at the same step when any of them got a signal.

    Example:
        >>> with Interrupts() as interrupts:
        ...     interrupts.requested(), interrupts.signal
        (False, None)
    """

    def __init__(self) -> None:
        self.signal: signal.Signals | None = None
        self._previous: dict[int, object] = {}

    def __enter__(self) -> Interrupts:
        if threading.current_thread() is threading.main_thread():
            self._previous = {s: signal.signal(s, self._handle) for s in SIGNALS}
        return self

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.signal == signal.SIGINT and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signal = self.signal or signal.Signals(signum)

    def pending(self) -> bool:
        """Whether this process got a signal (no collective: poll it after every step of a
        single-process run; :meth:`requested` decides for all processes)."""
        return self.signal is not None and jax.process_count() == 1

    def requested(self) -> bool:
        """Whether any process got a signal (a collective in multi-process runs)."""
        if jax.process_count() == 1:
            return self.signal is not None
        flags = multihost_utils.process_allgather(np.array(self.signal is not None))
        return bool(np.any(flags))

    def __exit__(self, *exc: object) -> None:
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)
