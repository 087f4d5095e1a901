"""Instruction records and the JSONL files that hold them.

Each line of a JSONL file is one object, either

    {"prompt": "...", "response": "..."}
    {"messages": [{"role": "system"|"user"|"assistant", "content": "..."}, ...]}

Other keys (ids, metadata) are ignored. Blank lines are skipped. A bad line raises ValueError
naming the file, the 1-based line number and what is wrong.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Iterator, Mapping
from typing import Any

ROLES = ("system", "user", "assistant")


@dataclasses.dataclass(frozen=True)
class Record:
    """One instruction example: a prompt/response pair or a chat conversation.

    ``source`` says where it came from (``"train.jsonl:12"``) for error messages.

    Example:
        >>> Record(prompt="2 + 2 =", response="4")
        >>> Record(messages=({"role": "user", "content": "hi"},
        ...                  {"role": "assistant", "content": "hello"}))
    """

    prompt: str | None = None
    response: str | None = None
    messages: tuple[Mapping[str, str], ...] | None = None
    source: str = ""

    def __post_init__(self) -> None:
        if self.messages is None:
            for name in ("prompt", "response"):
                value = getattr(self, name)
                if not isinstance(value, str):
                    raise ValueError(f"{name!r} must be a string, found {type(value).__name__}")
            return
        if self.prompt is not None or self.response is not None:
            raise ValueError("give either 'prompt'/'response' or 'messages', not both")
        if isinstance(self.messages, list):
            object.__setattr__(self, "messages", tuple(self.messages))
        if not isinstance(self.messages, tuple):
            raise ValueError(f"'messages' must be a list, found {type(self.messages).__name__}")
        if not self.messages:
            raise ValueError("'messages' is empty")
        for i, m in enumerate(self.messages):
            if not isinstance(m, Mapping):
                raise ValueError(f"messages[{i}] must be an object, found {type(m).__name__}")
            if m.get("role") not in ROLES:
                role = m.get("role")
                raise ValueError(f"messages[{i}]: role must be one of {ROLES}, found {role!r}")
            if not isinstance(m.get("content"), str):
                found = type(m.get("content")).__name__
                raise ValueError(f"messages[{i}]: content must be a string, found {found}")
        if not any(m["role"] == "assistant" for m in self.messages):
            raise ValueError("'messages' has no assistant message, so nothing to learn")

    @property
    def is_chat(self) -> bool:
        """True for a ``messages`` conversation, False for a prompt/response pair."""
        return self.messages is not None

    def key(self) -> str:
        """The record's content as canonical JSON (``source`` left out): equal records, equal keys.

        Example:
            >>> Record(prompt="a", response="b", source="x:1").key() == \
            ...     Record(prompt="a", response="b").key()
            True
        """
        if self.messages is None:
            return json.dumps([self.prompt, self.response])
        return json.dumps([[m["role"], m["content"]] for m in self.messages])

    @classmethod
    def from_json(cls, obj: Any, source: str = "") -> Record:
        """Validate one decoded JSON object.

        Example:
            >>> Record.from_json({"prompt": "a", "response": "b"}).response
            'b'
        """
        if not isinstance(obj, dict):
            raise ValueError(f"expected a JSON object, found {type(obj).__name__}")
        if "messages" in obj:
            if "prompt" in obj or "response" in obj:
                raise ValueError("give either 'prompt'/'response' or 'messages', not both")
            return cls(messages=obj["messages"], source=source)
        missing = [k for k in ("prompt", "response") if k not in obj]
        if missing:
            raise ValueError(
                f"missing {' and '.join(repr(k) for k in missing)}: expected 'prompt' and "
                f"'response' strings or a 'messages' list, found keys {sorted(obj)}"
            )
        return cls(prompt=obj["prompt"], response=obj["response"], source=source)


def iter_jsonl(path: str | os.PathLike) -> Iterator[Record]:
    """Yield the validated records of a JSONL file, each with ``source="path:line"``.

    Example:
        >>> records = list(iter_jsonl("assets/data/train.jsonl"))
    """
    path = os.fspath(path)
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{where}: invalid JSON ({e.msg} at column {e.colno})") from e
            try:
                yield Record.from_json(obj, source=where)
            except ValueError as e:
                raise ValueError(f"{where}: {e}") from e


def read_jsonl(path: str | os.PathLike) -> list[Record]:
    """All records of a JSONL file; raises ValueError at the first bad line.

    Example:
        >>> records = read_jsonl("assets/data/eval.jsonl")
    """
    records = list(iter_jsonl(path))
    if not records:
        raise ValueError(f"{os.fspath(path)}: no records (the file is empty)")
    return records
