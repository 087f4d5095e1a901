"""Chat templates, rendered with jinja2 the way transformers' ``apply_chat_template`` does.

A chat template is the jinja string in a model's ``tokenizer_config.json`` (or its
``chat_template.jinja``). transformers (``utils/chat_template_utils.py``) renders it in a
sandboxed jinja2 environment with ``trim_blocks`` and ``lstrip_blocks``, the ``loopcontrols``
extension (``{% break %}``, ``{% continue %}``), a ``{% generation %}`` block tag that marks
assistant text, a ``tojson`` filter that does not escape HTML, and the globals
``raise_exception`` and ``strftime_now``. The template sees ``messages``,
``add_generation_prompt``, ``tools=None``, ``documents=None`` and the named special tokens
(``bos_token``, ``eos_token``...). This module sets up the same environment, so a template
renders here to the same string, and ``{% generation %}`` blocks to the same character spans,
as it does in transformers. Anything jinja2 cannot compile or render (an unknown tag such as
``{% do %}``, an unknown filter, ``raise_exception``) raises ValueError saying so.

Own code rather than transformers because jpeft does not depend on transformers at run time;
jinja2 does the rendering.
"""

from __future__ import annotations

import contextvars
import dataclasses
import datetime
import functools
import json
from collections.abc import Mapping, Sequence
from typing import Any

import jinja2
import jinja2.ext
import jinja2.nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment

Message = Mapping[str, Any]

_FEATURES = (
    "Chat templates have jinja2's own tags and filters plus {% generation %}, {% break %}, "
    "{% continue %}, tojson, raise_exception and strftime_now, as in transformers."
)

# While a template renders: (the text blocks yielded so far, the generation spans found).
_TRACK: contextvars.ContextVar[tuple[list[str], list[tuple[int, int]]] | None]
_TRACK = contextvars.ContextVar("jpeft_chat_generation_spans", default=None)


@dataclasses.dataclass(frozen=True)
class RenderedChat:
    """A rendered conversation: its ``text`` and the ``[start, end)`` character spans of the
    template's ``{% generation %}`` blocks (empty when the template has none).

    Example:
        >>> chat = render("{% generation %}{{ messages[0]['content'] }}{% endgeneration %}!",
        ...               [{"role": "assistant", "content": "hi"}])
        >>> chat.text, chat.generation_spans
        ('hi!', ((0, 2),))
    """

    text: str
    generation_spans: tuple[tuple[int, int], ...] = ()


class _Generation(jinja2.ext.Extension):
    """``{% generation %}...{% endgeneration %}``: renders its body and records where it lies.

    The start is the length of the text the template has yielded before the block, as in
    transformers' ``AssistantTracker`` (so the spans agree with its ``assistant_masks``).
    """

    tags = frozenset({"generation"})

    def parse(self, parser: Any) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        call = self.call_method("_track", [])
        return jinja2.nodes.CallBlock(call, [], [], body).set_lineno(lineno)

    def _track(self, caller: Any) -> str:
        text = caller()
        tracking = _TRACK.get()
        if tracking is not None:
            blocks, spans = tracking
            start = sum(len(b) for b in blocks)
            spans.append((start, start + len(text)))
        return text


def _raise_exception(message: str) -> None:
    raise jinja2.TemplateError(message)


def _tojson(
    value: Any,
    ensure_ascii: bool = False,
    indent: int | None = None,
    separators: tuple[str, str] | None = None,
    sort_keys: bool = False,
) -> str:
    return json.dumps(
        value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


def _strftime_now(format: str) -> str:
    return datetime.datetime.now().strftime(format)


@functools.lru_cache(maxsize=16)
def compile_template(template: str) -> jinja2.Template:
    """The compiled template (cached); ValueError when jinja2 cannot compile it.

    Example:
        >>> compile_template("{% do x %}")
        Traceback (most recent call last):
        ValueError: the chat template cannot be compiled by jinja2 (line 1): Encountered unknown \
tag 'do'. Chat templates have jinja2's own tags and filters plus {% generation %}, {% break %}, \
{% continue %}, tojson, raise_exception and strftime_now, as in transformers.
    """
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_Generation, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    try:
        return env.from_string(template)
    except jinja2.TemplateError as e:
        line = f" (line {e.lineno})" if isinstance(e, jinja2.TemplateSyntaxError) else ""
        raise ValueError(
            f"the chat template cannot be compiled by jinja2{line}: {e.message} {_FEATURES}"
        ) from e


def render(
    template: str,
    messages: Sequence[Message],
    *,
    add_generation_prompt: bool = False,
    special_tokens: Mapping[str, str] | None = None,
) -> RenderedChat:
    """Render ``messages`` with a chat ``template``, as transformers'
    ``apply_chat_template(messages, tokenize=False, add_generation_prompt=...)`` does.

    ``special_tokens`` are the named tokens the template may use (``{"bos_token": "<s>",
    ...}``); like transformers, only the tokens a tokenizer defines are passed.

    Raises:
        ValueError: the template cannot be compiled or fails to render (including its own
            ``raise_exception``), or a message is not a mapping.

    Example:
        >>> render("{{ bos_token }}{% for m in messages %}[{{ m['content'] }}]{% endfor %}",
        ...        [{"role": "user", "content": "hi"}], special_tokens={"bos_token": "<s>"}).text
        '<s>[hi]'
    """
    compiled = compile_template(template)
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping):
            raise ValueError(f"message {i}: expected a mapping, found {type(m).__name__}")
    context = {
        # keys whose value is None are dropped, as transformers' _normalize_chat_messages does
        "messages": [{k: v for k, v in m.items() if v is not None} for m in messages],
        "tools": None,
        "documents": None,
        "add_generation_prompt": add_generation_prompt,
        **(special_tokens or {}),
    }
    blocks: list[str] = []
    spans: list[tuple[int, int]] = []
    token = _TRACK.set((blocks, spans))
    try:
        for block in compiled.generate(**context):  # one by one: see _Generation._track
            blocks.append(block)
    except jinja2.TemplateError as e:
        raise ValueError(f"the chat template failed to render: {e}") from e
    finally:
        _TRACK.reset(token)
    return RenderedChat("".join(blocks), tuple(spans))
