"""What a run reports: a metrics JSONL file, a progress bar, terminal lines, peak memory.

Only the main process writes or prints; the other processes of a multi-host run get
silent stand-ins, so the loop calls these unconditionally.
"""

from __future__ import annotations

import json
import math
import os
import resource
import sys
import time
from typing import Any

import jax
from tqdm import tqdm

from jpeft.train.distributed import is_main


def say(message: str) -> None:
    """Print a line on the main process without breaking an active progress bar.

    Example:
        >>> say("hello")
        hello
    """
    if is_main():
        tqdm.write(message, file=sys.stdout)
        sys.stdout.flush()


class MetricsLog:
    """Append one JSON object per line to ``path`` (``time``: seconds since the epoch).

    Example:
        >>> log = MetricsLog("/tmp/metrics.jsonl")
        >>> log.write({"step": 1, "loss": 2.5})
        >>> log.close()
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.file = None
        if is_main():  # appended to, never through a symbolic link
            fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW, 0o666)
            self.file = os.fdopen(fd, "a", encoding="utf-8")

    def write(self, record: dict[str, Any]) -> None:
        """Write ``record`` (non-finite floats become strings: JSON has no NaN)."""
        if self.file is None:
            return
        clean = {k: _jsonable(v) for k, v in record.items()}
        self.file.write(json.dumps({**clean, "time": round(time.time(), 3)}) + "\n")
        self.file.flush()

    def close(self) -> None:
        """Close the file."""
        if self.file is not None:
            self.file.close()


class Progress:
    """A tqdm bar over optimizer steps showing loss and tokens/s (tqdm adds the ETA).

    Example:
        >>> bar = Progress(total=100, initial=0)
        >>> bar.update(1, loss=2.3, tokens_per_second=1500.0)
        >>> bar.close()
    """

    def __init__(self, total: int, initial: int) -> None:
        self.bar = None
        if is_main():
            self.bar = tqdm(
                total=total, initial=initial, desc="train", unit="step", dynamic_ncols=True
            )

    def update(self, steps: int, loss: float, tokens_per_second: float) -> None:
        """Advance by ``steps`` and show the latest numbers."""
        if self.bar is None:
            return
        self.bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{tokens_per_second:,.0f}", refresh=False)
        self.bar.update(steps)

    def close(self) -> None:
        """Finish the bar."""
        if self.bar is not None:
            self.bar.close()


def peak_memory_bytes() -> tuple[int, str]:
    """``(bytes, what)``: the accelerator's peak allocation, or this process's peak RSS.

    Example:
        >>> nbytes, what = peak_memory_bytes()
        >>> nbytes > 0 and what in ("device peak", "host peak RSS")
        True
    """
    stats = jax.local_devices()[0].memory_stats() or {}
    if "peak_bytes_in_use" in stats:
        return int(stats["peak_bytes_in_use"]), "device peak"
    scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss: bytes on macOS, KiB on Linux
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale, "host peak RSS"


def _jsonable(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value
