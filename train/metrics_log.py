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
import numpy as np
from tqdm import tqdm

from jpeft.models.atomic import write_text
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


# metrics.jsonl keys -> TensorBoard tags
TENSORBOARD_TAGS = {
    "loss": "train/loss",
    "learning_rate": "train/learning_rate",
    "grad_norm": "train/grad_norm",
    "tokens_per_second": "train/tokens_per_second",
    "eval_loss": "eval/loss",
    "eval_perplexity": "eval/perplexity",
    "eval_accuracy": "eval/accuracy",
}


class MetricsLog:
    """Rows of ``metrics.jsonl`` (one JSON object per line, ``time``: seconds since the
    epoch), and the same scalars as TensorBoard event files in ``tensorboard_dir``.

    The file is appended to, never through a symbolic link. ``purge_step`` (a resumed
    run's first new step) tells TensorBoard to drop the events an earlier process wrote
    from that step on. TensorBoard events are written by tensorboardX (no TensorFlow).

    Example:
        >>> import tempfile
        >>> log = MetricsLog(os.path.join(tempfile.mkdtemp(), "metrics.jsonl"))
        >>> log.write({"step": 1, "loss": 2.5})
        >>> log.close()
    """

    def __init__(
        self,
        path: str | os.PathLike,
        tensorboard_dir: str | None = None,
        purge_step: int | None = None,
    ) -> None:
        self.file, self.board = None, None
        if not is_main():
            return
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW, 0o666)
        self.file = os.fdopen(fd, "a", encoding="utf-8")
        if tensorboard_dir is not None:
            from tensorboardX import SummaryWriter

            self.board = SummaryWriter(tensorboard_dir, purge_step=purge_step)

    def write(self, record: dict[str, Any]) -> None:
        """Write ``record`` (non-finite floats become strings: JSON has no NaN)."""
        if self.file is None:
            return
        clean = {k: _jsonable(v) for k, v in record.items()}
        self.file.write(json.dumps({**clean, "time": round(time.time(), 3)}) + "\n")
        self.file.flush()
        if self.board is not None:
            for key, tag in TENSORBOARD_TAGS.items():
                if key in record:
                    self.board.add_scalar(tag, record[key], record["step"])

    def sync(self) -> None:
        """Make the rows written so far durable (with a checkpoint: they describe it)."""
        if self.file is not None:
            self.file.flush()
            os.fsync(self.file.fileno())
        if self.board is not None:
            self.board.flush()

    def close(self) -> None:
        """Close the file and the event writer."""
        if self.file is not None:
            self.file.close()
        if self.board is not None:
            self.board.close()


def rewind(path: str | os.PathLike, step: int, redo_eval: bool) -> int:
    """Keep the rows of ``metrics.jsonl`` up to ``step`` (a restored checkpoint's), so a
    resumed run writes exactly one row per step; returns the number of rows dropped.

    Rows after ``step`` (written before a crash, by steps the resumed run repeats) go;
    so do the evaluation rows at ``step`` when ``redo_eval`` (the resumed run evaluates
    there again), and a last line cut short by a killed process. Rewritten atomically.

    Example:
        >>> import tempfile
        >>> path = os.path.join(tempfile.mkdtemp(), "metrics.jsonl")
        >>> with open(path, "w") as f:
        ...     _ = f.write('{"step": 1}\\n{"step": 2}\\n{"step": 3}\\n{"st')
        >>> rewind(path, 2, redo_eval=False)
        2
    """
    if not os.path.isfile(path):
        return 0
    with open(path, encoding="utf-8") as f:
        lines = f.read().splitlines()
    kept = []
    for line in lines:
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        evaluation = any(k.startswith("eval_") for k in row)
        if row["step"] < step or (row["step"] == step and not (evaluation and redo_eval)):
            kept.append(line)
    write_text(path, "".join(line + "\n" for line in kept))
    return len(lines) - len(kept)


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

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Window:
    """Mean loss and throughput of the steps since the last metrics row.

    Example:
        >>> w = Window()
        >>> w.add(2.0, tokens=100, seconds=0.5); w.add(1.0, tokens=100, seconds=0.5)
        >>> w.flush()
        {'loss': 1.5, 'tokens_per_second': 200.0}
    """

    def __init__(self) -> None:
        self.losses: list[float] = []
        self.tokens, self.seconds = 0, 0.0
        self.rate = 0.0

    def add(self, loss: float, tokens: int, seconds: float) -> None:
        """Count a step; one with no tokens counted (a compiling one) adds no time."""
        self.losses.append(loss)
        if tokens:
            self.tokens += tokens
            self.seconds += seconds
            self.rate = self.tokens / self.seconds

    def flush(self) -> dict[str, float]:
        """The row's ``loss`` and ``tokens_per_second``; starts a new window."""
        out = {"loss": float(np.mean(self.losses)), "tokens_per_second": self.rate}
        self.losses, self.tokens, self.seconds = [], 0, 0.0
        return out


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
