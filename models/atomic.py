"""Atomic file writes: a reader sees the old file or the new one, never a partial one."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator


@contextlib.contextmanager
def atomic_path(final: str | os.PathLike) -> Iterator[str]:
    """Yield a temporary path next to ``final``; on success it replaces ``final``.

    The file gets the permissions a plain ``open(final, "w")`` would (``0o666`` less the
    umask); on an exception the temporary file is removed and ``final`` is untouched.

    Example:
        >>> with atomic_path("out/config.json") as tmp:  # doctest: +SKIP
        ...     with open(tmp, "w") as f:
        ...         f.write("{}")
    """
    final = os.fspath(final)
    fd, tmp = tempfile.mkstemp(
        dir=os.path.dirname(final) or ".", prefix=f".{os.path.basename(final)}."
    )
    os.close(fd)
    try:
        os.chmod(tmp, 0o666 & ~_umask())
        yield tmp
        os.replace(tmp, final)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
