"""Records: one training example before tokenization, whatever file format it came from.

A record is a prompt/response pair, a chat conversation (``messages``) or a plain text
(continued pre-training). The file formats (alpaca, ShareGPT...) map onto these three in
:mod:`jpeft.train.data.formats`.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from typing import Any

ROLES = ("system", "user", "assistant")


def _check_string(value: Any, name: str) -> None:
    if not isinstance(value, str):
        raise ValueError(f"{name!r} must be a string, found {type(value).__name__}")


@dataclasses.dataclass(frozen=True)
class Record:
    """One example: ``prompt``/``response``, ``messages``, or ``text`` (exactly one kind).

    ``source`` says where it came from (``"train.jsonl:12"``) for error messages.

    Example:
        >>> Record(prompt="2 + 2 =", response="4").kind
        'prompt-response'
        >>> Record(messages=({"role": "user", "content": "hi"},
        ...                  {"role": "assistant", "content": "hello"})).kind
        'messages'
        >>> Record(text="Once upon a time.").kind
        'text'
    """

    prompt: str | None = None
    response: str | None = None
    messages: tuple[Mapping[str, str], ...] | None = None
    text: str | None = None
    source: str = ""

    def __post_init__(self) -> None:
        given = [
            name
            for name, value in (
                ("'prompt'/'response'", self.prompt if self.prompt is not None else self.response),
                ("'messages'", self.messages),
                ("'text'", self.text),
            )
            if value is not None
        ]
        if len(given) != 1:
            raise ValueError(
                f"give exactly one of 'prompt'/'response', 'messages' or 'text', found {given}"
            )
        if self.text is not None:
            _check_string(self.text, "text")
        elif self.messages is None:
            _check_string(self.prompt, "prompt")
            _check_string(self.response, "response")
        else:
            self._check_messages()

    def _check_messages(self) -> None:
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
    def kind(self) -> str:
        """``"prompt-response"``, ``"messages"`` or ``"text"``."""
        if self.text is not None:
            return "text"
        return "prompt-response" if self.messages is None else "messages"

    @property
    def is_chat(self) -> bool:
        """True for a ``messages`` conversation."""
        return self.messages is not None

    def key(self) -> str:
        """The record's content as canonical JSON (``source`` left out): equal records, equal keys.

        Example:
            >>> Record(prompt="a", response="b", source="x:1").key() == \\
            ...     Record(prompt="a", response="b").key()
            True
        """
        if self.text is not None:
            return json.dumps(self.text)
        if self.messages is None:
            return json.dumps([self.prompt, self.response])
        return json.dumps([[m["role"], m["content"]] for m in self.messages])
