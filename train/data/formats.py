"""The record formats of data files, and which one a file uses.

Each format names the key that identifies it and turns one decoded object into a
:class:`~jpeft.train.data.records.Record`:

==================  ==========================================================================
format              keys of each record
==================  ==========================================================================
``prompt-response`` ``prompt``, ``response`` (strings)
``alpaca``          ``instruction``, ``output``, optional ``input`` (strings; ``input`` may
                    be empty or null). The user turn is the instruction, then a blank line
                    and the input when there is one.
``sharegpt``        ``conversations``: a list of ``{"from": "system"|"human"|"gpt",
                    "value": "..."}``
``messages``        ``messages``: a list of ``{"role": "system"|"user"|"assistant",
                    "content": "..."}`` (HF chat format)
``text``            ``text``: a document for continued pre-training (loss on every token)
==================  ==========================================================================

Other keys are ignored. With ``format="auto"`` each record's format is detected from its
keys: it must carry the identifying key of exactly one instruction format (``text`` counts
only when none is there, since alpaca files often carry a ``text`` column too). Text records
cannot be mixed with instruction records.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from jpeft.train.data.records import Record

SHAREGPT_ROLES = {"system": "system", "human": "user", "gpt": "assistant"}

HELP = """\
data files (--train-data, --eval-data): JSONL (one object per line), a JSON array of objects,
or Parquet (pip install 'jpeft[parquet]'); any other file is plain text, documents separated
by blank lines. Each record is one of these formats, detected from its keys (force one with
--data-format):
  prompt-response  {"prompt": "...", "response": "..."}
  alpaca           {"instruction": "...", "input": "..." (optional), "output": "..."}
  sharegpt         {"conversations": [{"from": "system"|"human"|"gpt", "value": "..."}, ...]}
  messages         {"messages": [{"role": "system"|"user"|"assistant", "content": "..."}, ...]}
  text             {"text": "..."}: continued pre-training, loss on every token
Other keys are ignored. Instruction records are rendered with the model's chat template (an
alpaca record as a user turn holding the instruction, a blank line and the input, then the
output as the assistant turn) and the loss covers the assistant turns; without a chat
template a prompt/response pair is the prompt followed directly by the response and EOS.
"""


def _string(obj: Mapping[str, Any], key: str, optional: bool = False) -> str:
    value = obj.get(key)
    if value is None and optional:
        return ""
    if key not in obj:
        raise ValueError(f"missing {key!r} (found keys {sorted(obj)})")
    if not isinstance(value, str):
        raise ValueError(f"{key!r} must be a string, found {type(value).__name__}")
    return value


def _prompt_response(obj: Mapping[str, Any], source: str) -> Record:
    missing = [k for k in ("prompt", "response") if k not in obj]
    if missing:
        raise ValueError(
            f"missing {' and '.join(repr(k) for k in missing)}: a prompt-response record has "
            f"'prompt' and 'response' strings, found keys {sorted(obj)}"
        )
    return Record(prompt=obj["prompt"], response=obj["response"], source=source)


def _alpaca(obj: Mapping[str, Any], source: str) -> Record:
    instruction, extra = _string(obj, "instruction"), _string(obj, "input", optional=True)
    prompt = f"{instruction}\n\n{extra}" if extra else instruction
    return Record(prompt=prompt, response=_string(obj, "output"), source=source)


def _sharegpt(obj: Mapping[str, Any], source: str) -> Record:
    turns = obj.get("conversations")
    if not isinstance(turns, list):
        raise ValueError(f"'conversations' must be a list, found {type(turns).__name__}")
    messages = []
    for i, turn in enumerate(turns):
        if not isinstance(turn, Mapping):
            raise ValueError(f"conversations[{i}] must be an object, found {type(turn).__name__}")
        speaker = turn.get("from")
        if speaker not in SHAREGPT_ROLES:
            raise ValueError(
                f"conversations[{i}]: 'from' must be one of {tuple(SHAREGPT_ROLES)}, "
                f"found {speaker!r}"
            )
        value = turn.get("value")
        if not isinstance(value, str):
            found = type(value).__name__
            raise ValueError(f"conversations[{i}]: 'value' must be a string, found {found}")
        messages.append({"role": SHAREGPT_ROLES[speaker], "content": value})
    return Record(messages=tuple(messages), source=source)


def _messages(obj: Mapping[str, Any], source: str) -> Record:
    return Record(messages=obj["messages"], source=source)


def _text(obj: Mapping[str, Any], source: str) -> Record:
    return Record(text=_string(obj, "text"), source=source)


# format name -> (identifying key, parser)
FORMATS: dict[str, tuple[str, Callable[[Mapping[str, Any], str], Record]]] = {
    "prompt-response": ("prompt", _prompt_response),
    "alpaca": ("instruction", _alpaca),
    "sharegpt": ("conversations", _sharegpt),
    "messages": ("messages", _messages),
    "text": ("text", _text),
}


def detect_format(obj: Any) -> str:
    """The format of one decoded record, from its keys.

    Example:
        >>> detect_format({"instruction": "Add", "input": "2 2", "output": "4", "text": "..."})
        'alpaca'
    """
    if not isinstance(obj, Mapping):
        raise ValueError(f"expected a JSON object, found {type(obj).__name__}")
    found = [name for name, (key, _) in FORMATS.items() if key in obj and name != "text"]
    if not found and "text" in obj:
        found = ["text"]
    if len(found) > 1:
        raise ValueError(
            f"the record has the keys of several formats, {' and '.join(found)} (give the keys "
            "of one format, not both, or choose one with --data-format)"
        )
    if not found:
        expected = ", ".join(f"{key!r} ({name})" for name, (key, _) in FORMATS.items())
        raise ValueError(f"no known record keys: expected one of {expected}, found {sorted(obj)}")
    return found[0]


def parse_record(obj: Any, format: str = "auto", source: str = "") -> Record:
    """One decoded object as a :class:`Record` of ``format`` (``"auto"``: detected).

    Example:
        >>> parse_record({"conversations": [{"from": "human", "value": "hi"},
        ...                                 {"from": "gpt", "value": "hello"}]}).messages[1]
        {'role': 'assistant', 'content': 'hello'}
    """
    if format == "auto":
        format = detect_format(obj)
    if format not in FORMATS:
        raise ValueError(f"unknown data format {format!r}; expected auto or one of {list(FORMATS)}")
    if not isinstance(obj, Mapping):
        raise ValueError(f"expected a JSON object, found {type(obj).__name__}")
    key, parser = FORMATS[format]
    if key not in obj and format != "prompt-response":
        raise ValueError(f"missing {key!r}: a {format} record needs it, found keys {sorted(obj)}")
    return parser(obj, source)
