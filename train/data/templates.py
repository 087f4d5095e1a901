"""Render a record as one text plus the character spans of its targets (the loss).

With a chat template (the tokenizer's), a conversation is rendered by the template exactly as
transformers' ``apply_chat_template`` renders it, and a prompt/response pair (alpaca records
too) is rendered as a one-turn user/assistant conversation. The targets are the assistant
turns:

* a template with ``{% generation %}`` blocks marks them itself; the spans are those blocks,
  as in transformers' ``return_assistant_tokens_mask``;
* any other template is rendered prefix by prefix: the target of assistant message ``i`` is
  what the rendering of messages ``0..i`` adds to the rendering of messages ``0..i-1`` with
  ``add_generation_prompt=True`` (its content and the end-of-turn token, ``" answer </s>"`` in
  LLaMA 2, ``"answer<|eot_id|>"`` in LLaMA 3). Each rendering must extend the previous one.

The text is tokenized once, as a whole, with ``add_special_tokens=False`` (the template
writes BOS), so the ids are transformers' ``apply_chat_template(..., tokenize=True)``; a token
is a target when its characters overlap a target span (transformers' rule).

Without a chat template a prompt/response pair is the prompt followed directly by the
response (put any separator you want in the prompt), tokenized with the tokenizer's special
tokens (BOS as an id, as ``tokenizer(text)``), then EOS; the response and EOS are the targets.
Chat records need a template.
"""

from __future__ import annotations

import dataclasses

from jpeft.models.tokenizer import Tokenizer
from jpeft.train.data.records import Record

Span = tuple[int, int]


@dataclasses.dataclass(frozen=True)
class Rendered:
    """A record as text: ``targets`` are ``[start, end)`` character spans of the loss,
    ``add_special_tokens`` whether the tokenizer adds its special tokens (BOS) while encoding,
    ``add_eos`` whether an EOS id (a target) follows the text.

    Example:
        >>> r = Rendered("Q: 2+2? A: 4", targets=((10, 12),), add_special_tokens=True, add_eos=True)
        >>> r.prompt, r.text[10:12]
        ('Q: 2+2? A:', ' 4')
    """

    text: str
    targets: tuple[Span, ...]
    add_special_tokens: bool = False
    add_eos: bool = False

    @property
    def prompt(self) -> str:
        """The text before the last target: what a model continues to produce it."""
        return self.text[: self.targets[-1][0]]


def _chat(tokenizer: Tokenizer, messages: list[dict[str, str]]) -> Rendered:
    full = tokenizer.render_chat(messages)
    if full.generation_spans:
        return Rendered(full.text, full.generation_spans)
    spans: list[Span] = []
    done = ""
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prefix = tokenizer.render_chat(messages[:i], add_generation_prompt=True).text
        last = i == len(messages) - 1
        turn = full.text if last else tokenizer.render_chat(messages[: i + 1]).text
        if not (prefix.startswith(done) and turn.startswith(prefix)):
            raise ValueError(
                "the chat template's rendering of a conversation prefix is not a prefix of the "
                f"rendering of the longer conversation (at message {i}), so the assistant "
                "tokens cannot be located; mark them with {% generation %} in the template"
            )
        spans.append((len(prefix), len(turn)))
        done = turn
    if not full.text.startswith(done):
        raise ValueError(
            "the chat template's rendering of the whole conversation does not extend its "
            "rendering up to the last assistant message, so the assistant tokens cannot be "
            "located; mark them with {% generation %} in the template"
        )
    return Rendered(full.text, tuple(spans))


def render_record(tokenizer: Tokenizer, record: Record) -> Rendered:
    """The record's text and target spans (see the module doc).

    Raises:
        ValueError: naming the record, when the template fails, cannot locate the
            assistant turns, or a chat record meets a tokenizer without a template.

    Example:
        >>> from jpeft import assets
        >>> tok = Tokenizer.from_dir(assets.path("tiny-llama"))
        >>> r = render_record(tok, Record(prompt="Sort: 3 1", response="1 3"))
        >>> r.text, [r.text[s:e] for s, e in r.targets]
        ('<s>[INST] Sort: 3 1 [/INST] 1 3 </s>', [' 1 3 </s>'])
    """
    if record.kind == "text":
        raise ValueError(f"{record.source or 'record'}: a text record has no prompt to render")
    try:
        if record.is_chat:
            return _chat(tokenizer, [dict(m) for m in record.messages])
        if tokenizer.chat_template is not None:
            messages = [
                {"role": "user", "content": record.prompt},
                {"role": "assistant", "content": record.response},
            ]
            return _chat(tokenizer, messages)
    except ValueError as e:
        raise ValueError(f"{record.source or 'record'}: {e}") from e
    text = record.prompt + record.response
    return Rendered(text, ((len(record.prompt), len(text)),), add_special_tokens=True, add_eos=True)


def reference_answer(record: Record) -> str:
    """The text a model should generate for the record: the (last assistant) response.

    Example:
        >>> reference_answer(Record(prompt="2 + 2 =", response="4"))
        '4'
    """
    if record.is_chat:
        return [m for m in record.messages if m["role"] == "assistant"][-1]["content"]
    return record.response


def exact_match(generated: str, reference: str) -> bool:
    """Exact-match accuracy criterion: equal after stripping surrounding whitespace.

    Example:
        >>> exact_match(" 1 2 3 ", "1 2 3")
        True
    """
    return generated.strip() == reference.strip()
