"""The one writer of jpeft's files: atomic, durable, with the umask's permissions.

A reader sees the old file or the new one, never a partial one, and a file whose
write returned survives a power cut: :func:`atomic_path` writes a temporary file in
the target directory, fsyncs it, renames it over the target (``os.replace``, which
also replaces a symlink planted there rather than following it) and fsyncs the
directory so that the rename itself is on disk (POSIX ``fsync(2)``, ``rename(2)``).
:func:`write_text` and :func:`write_json` are the common cases.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import tempfile
from collections.abc import Iterator
from typing import Any


@contextlib.contextmanager
def atomic_path(final: str | os.PathLike) -> Iterator[str]:
    """Yield a temporary path next to ``final``; on success it replaces ``final`` durably.

    Whatever the body leaves at the temporary path (written in place, or replaced by a
    library that writes its own temporary file and renames it, as
    ``safetensors.numpy.save_file`` does) gets the permissions a plain
    ``open(final, "w")`` would give (``0o666`` less the umask), is fsynced, renamed to
    ``final``, and the directory is fsynced. On an exception the temporary file is
    removed and ``final`` is untouched.

    Raises:
        OSError: from the filesystem (the directory missing, the disk full...).

    Example:
        >>> import tempfile
        >>> out = os.path.join(tempfile.mkdtemp(), "config.json")
        >>> with atomic_path(out) as tmp, open(tmp, "w") as f:
        ...     _ = f.write("{}")
        >>> open(out).read()
        '{}'
    """
    final = os.fspath(final)
    directory = os.path.dirname(final) or "."
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{os.path.basename(final)}.")
    os.close(fd)
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~_umask())  # after the body: it may have replaced tmp
        _fsync(tmp, os.O_RDONLY)
        os.replace(tmp, final)
        _fsync(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    finally:
        if os.path.lexists(tmp):
            os.remove(tmp)


def write_text(final: str | os.PathLike, text: str) -> None:
    """Write ``text`` (UTF-8) to ``final`` through :func:`atomic_path`.

    Example:
        >>> import tempfile
        >>> out = os.path.join(tempfile.mkdtemp(), "note.txt")
        >>> write_text(out, "done\\n")
        >>> open(out).read()
        'done\\n'
    """
    with atomic_path(final) as tmp, open(tmp, "w", encoding="utf-8") as f:
        f.write(text)


def write_json(final: str | os.PathLike, obj: Any) -> None:
    """Write ``obj`` as indented JSON with sorted keys (and a final newline) to ``final``.

    Example:
        >>> import tempfile
        >>> out = os.path.join(tempfile.mkdtemp(), "config.json")
        >>> write_json(out, {"b": 1, "a": [2]})
        >>> print(open(out).read(), end="")
        {
          "a": [
            2
          ],
          "b": 1
        }
    """
    write_text(final, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def _umask() -> int:
    """The process umask, read without changing it where Linux allows (thread-safe)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)  # elsewhere: set and restore at once
    os.umask(mask)
    return mask


def _fsync(path: str, flags: int) -> None:
    """``fsync`` ``path``; a filesystem that cannot sync a directory (EINVAL) is let be."""
    fd = os.open(path, flags)
    try:
        os.fsync(fd)
    except OSError as e:
        if e.errno != errno.EINVAL:
            raise
    finally:
        os.close(fd)
