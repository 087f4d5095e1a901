"""The run directory of ``jpeft train``: what it holds and the rules for writing into it.

A run directory holds ``run.yaml`` (the resolved options), ``metrics.jsonl``,
TensorBoard event files (``events.out.tfevents.*``), ``checkpoints/<step>`` (orbax),
``adapter/`` (peft format) and ``summary.json``. Nothing a user trained is replaced
silently: a new run refuses a directory that is not empty unless ``--overwrite`` is
given, and then removes only these entries. jpeft follows no symbolic link inside a run
directory: a link in place of any of these entries (or of a checkpoint step) is refused,
since writing or deleting through it would touch files outside the run.
"""

from __future__ import annotations

import os
import shutil

CONFIG = "run.yaml"
METRICS = "metrics.jsonl"
SUMMARY = "summary.json"
CHECKPOINTS = "checkpoints"
ADAPTER = "adapter"
EVENTS_PREFIX = "events.out.tfevents."
ENTRIES = (CONFIG, METRICS, SUMMARY, CHECKPOINTS, ADAPTER)


def check(out: str, *, resume: bool, overwrite: bool) -> None:
    """Check ``out`` before a run starts (reads only; :func:`start` then clears and creates).

    Raises ValueError (naming the directory and what to do) when ``out`` is a file, when
    a new run would write over a non-empty directory without ``overwrite``, when a resumed
    directory is not a run, and when any entry of the run is a symbolic link.

    Example:
        >>> import tempfile
        >>> out = tempfile.mkdtemp()
        >>> check(out, resume=False, overwrite=False)  # an empty directory is fine
        >>> open(os.path.join(out, "run.yaml"), "w").close()
        >>> check(out, resume=False, overwrite=False)  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ValueError: ... already holds a run (run.yaml); continue it with --resume ...
    """
    if os.path.lexists(out) and not os.path.isdir(out):
        raise ValueError(f"run directory {out!r} is an existing file, not a directory")
    if resume and overwrite:
        raise ValueError("give --resume or --overwrite, not both")
    check_no_links(out)
    present = _present(out)
    if resume:
        if CONFIG not in present:
            raise ValueError(f"--resume {out!r}: not a run directory (no {CONFIG})")
    elif os.path.isdir(out) and os.listdir(out) and not overwrite:
        held = f"already holds a run ({', '.join(present)})" if present else "is not empty"
        raise ValueError(
            f"run directory {out!r} {held}; continue it with --resume {out}, "
            "replace it with --overwrite, or choose another --output-dir"
        )


def start(out: str, *, resume: bool) -> None:
    """Create ``out``; a new run first removes a previous run's entries (after :func:`check`).

    Example:
        >>> import tempfile
        >>> out = os.path.join(tempfile.mkdtemp(), "run")
        >>> start(out, resume=False)
        >>> os.listdir(out)
        []
    """
    check_no_links(out)
    if not resume:
        for name in _present(out):
            path = os.path.join(out, name)
            shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
    os.makedirs(out, exist_ok=True)


def _present(out: str) -> list[str]:
    """The run's entries that exist in ``out``, in :data:`ENTRIES` order, then event files."""
    if not os.path.isdir(out):
        return []
    names = os.listdir(out)
    events = sorted(n for n in names if n.startswith(EVENTS_PREFIX))
    return [n for n in ENTRIES if n in names] + events


def check_no_links(out: str) -> None:
    """ValueError if an entry of the run, or a checkpoint step, is a symbolic link.

    Example:
        >>> check_no_links("no/such/run")  # nothing there yet: nothing to refuse
    """
    paths = [os.path.join(out, name) for name in _present(out)]
    steps = os.path.join(out, CHECKPOINTS)
    if os.path.isdir(steps) and not os.path.islink(steps):
        paths += [os.path.join(steps, name) for name in sorted(os.listdir(steps))]
    for path in paths:
        if os.path.islink(path):
            raise ValueError(
                f"{path} is a symbolic link (to {os.readlink(path)!r}); jpeft does not write "
                "or delete through links in a run directory: remove the link"
            )
