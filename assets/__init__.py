"""The bundled tiny LLaMA (``tiny-llama/``) and its task data (``data/``), as package data.

:func:`path` gives a bundled file's location wherever jpeft is installed. The CLI's
defaults are written ``assets/<name>``; :func:`resolve` maps such a path here when it
does not exist relative to the working directory.

Example:
    >>> import os
    >>> os.path.isfile(os.path.join(path("tiny-llama"), "config.json"))
    True
    >>> os.path.samefile(resolve("assets/data/eval.jsonl"), path("data/eval.jsonl"))
    True
"""

from __future__ import annotations

import os

PREFIX = "assets/"
ROOT = os.path.dirname(os.path.abspath(__file__))


def path(name: str) -> str:
    """The installed location of bundled ``name`` (``"tiny-llama"``, ``"data/train.jsonl"``).

    Raises:
        FileNotFoundError: nothing of that name is bundled.
    """
    found = os.path.join(ROOT, name)
    if not os.path.exists(found):
        bundled = sorted(e for e in os.listdir(ROOT) if not e.startswith(("_", ".")))
        raise FileNotFoundError(f"no bundled asset {name!r} in {ROOT} (it holds {bundled})")
    return found


def resolve(name: str) -> str:
    """``name`` itself if it exists or is not an ``assets/...`` path, else the bundled file."""
    if name.startswith(PREFIX) and not os.path.exists(name):
        bundled = os.path.join(ROOT, name[len(PREFIX) :])
        if os.path.exists(bundled):
            return bundled
    return name
