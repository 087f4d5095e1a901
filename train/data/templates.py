"""Render records as text chunks, each marked prompt (no loss) or target (loss).

With a chat template (the tokenizer's), a conversation is rendered by the template, and a
prompt/response pair is rendered as a one-turn user/assistant conversation. The target chunks
are what the template adds for each assistant message: its content and the end-of-turn token
(``" answer </s>"`` in LLaMA 2, ``"answer<|eot_id|>"`` in LLaMA 3). They are found by rendering
the conversation prefix by prefix, so any template whose renderings extend each other works.

Without a chat template a prompt/response pair is ``<s>`` + prompt (prompt) then response +
``</s>`` (target), with nothing in between: put any separator you want in the prompt. Chat
records need a template.

Chunks are tokenized separately (see ``encode``), so the prompt of an example tokenizes the
same in training and at generation time (``generation_prompt``).
"""

from __future__ import annotations

from jpeft.models.tokenizer import Tokenizer
from jpeft.train.data.jsonl import Record

Chunk = tuple[str, bool]  # (text, is_target)


def _chat_chunks(tokenizer: Tokenizer, messages: list[dict[str, str]]) -> list[Chunk]:
    chunks: list[Chunk] = []
    done = ""
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prefix = tokenizer.apply_chat_template(messages[:i], add_generation_prompt=True)
        full = tokenizer.apply_chat_template(messages[: i + 1])
        if not (prefix.startswith(done) and full.startswith(prefix)):
            raise ValueError(
                "the chat template's rendering of a conversation prefix is not a prefix of the "
                f"rendering of the longer conversation (at message {i}), so the assistant "
                "tokens cannot be located"
            )
        chunks += [(prefix[len(done) :], False), (full[len(prefix) :], True)]
        done = full
    rest = tokenizer.apply_chat_template(messages)[len(done) :]
    if rest:
        chunks.append((rest, False))
    return [c for c in chunks if c[0]]


def record_chunks(tokenizer: Tokenizer, record: Record) -> list[Chunk]:
    """The record's text as (text, is_target) chunks, BOS/EOS included as token strings.

    Example:
        >>> record_chunks(tok, Record(prompt="Sort: 3 1", response="1 3"))
        [('<s>[INST] Sort: 3 1 [/INST]', False), (' 1 3 </s>', True)]
    """
    try:
        if record.is_chat:
            return _chat_chunks(tokenizer, [dict(m) for m in record.messages])
        if tokenizer.chat_template is not None:
            messages = [
                {"role": "user", "content": record.prompt},
                {"role": "assistant", "content": record.response},
            ]
            return _chat_chunks(tokenizer, messages)
    except ValueError as e:
        raise ValueError(f"{record.source or 'record'}: {e}") from e
    bos, eos = tokenizer.bos_token or "", tokenizer.eos_token or ""
    return [(bos + record.prompt, False), (record.response + eos, True)]


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
