"""Opening the files of a model directory with errors that name the file and the cause.

``os.path.isfile`` answers False for a missing file, a dangling symlink, a symlink
loop and an unreadable directory alike; :func:`require_file` tells them apart, and
:func:`read_json` adds the file name (and line, column) to a JSON syntax error.
"""

from __future__ import annotations

import errno
import json
import os
import stat
from typing import Any


def require_file(path: str | os.PathLike) -> str:
    """``path`` as a string if it is a regular file (or a symlink to one) that can be opened.

    Raises:
        FileNotFoundError: nothing is there, or a symlink points at nothing.
        ValueError: a symlink loop, a directory or other non-file, no permission.

    Example:
        >>> import tempfile
        >>> d = tempfile.mkdtemp()
        >>> os.symlink("loop.json", os.path.join(d, "loop.json"))
        >>> require_file(os.path.join(d, "loop.json"))  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        ValueError: .../loop.json: cannot open it: a symlink loop (Too many levels of ...)
    """
    path = os.fspath(path)
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError as e:
        if os.path.islink(path):
            raise FileNotFoundError(
                f"{path}: a symlink to {os.readlink(path)!r}, which does not exist"
            ) from e
        raise FileNotFoundError(f"{path}: no such file") from e
    except OSError as e:
        why = "a symlink loop " if e.errno == errno.ELOOP else ""
        raise ValueError(f"{path}: cannot open it: {why}({e.strerror})") from e
    if not stat.S_ISREG(mode):
        kind = "a directory" if stat.S_ISDIR(mode) else "not a regular file"
        raise ValueError(f"{path}: {kind}, expected a file")
    if not os.access(path, os.R_OK):
        raise ValueError(f"{path}: cannot open it: no read permission")
    return path


def read_json(path: str | os.PathLike) -> Any:
    """The parsed contents of a JSON file; a bad file raises an error naming it.

    Raises:
        FileNotFoundError, ValueError: as :func:`require_file`, and for a file that is
            not UTF-8 JSON (with the line and column of a syntax error).

    Example:
        >>> import tempfile
        >>> bad = os.path.join(tempfile.mkdtemp(), "config.json")
        >>> _ = open(bad, "w").write('{"hidden_size": }')
        >>> read_json(bad)  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        ValueError: .../config.json: not valid JSON: Expecting value (line 1, column 17)
    """
    path = require_file(path)
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(
            f"{path}: not valid JSON: {e.msg} (line {e.lineno}, column {e.colno})"
        ) from e
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not valid JSON: not UTF-8 text ({e.reason})") from e
