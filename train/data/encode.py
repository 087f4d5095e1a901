"""Records to tokenized examples: the ids of the rendered text and the loss mask over them."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from jpeft.models.tokenizer import Tokenizer
from jpeft.train.data.corpus import corpus_examples
from jpeft.train.data.example import TOO_LONG_ADVICE, Example, fit_length
from jpeft.train.data.records import Record
from jpeft.train.data.templates import render_record


def target_mask(offsets: Sequence[tuple[int, int]], spans: Sequence[tuple[int, int]]) -> np.ndarray:
    """1 for each token whose ``[start, end)`` characters overlap a span, else 0: the rule of
    transformers' ``apply_chat_template(..., return_assistant_tokens_mask=True)``.

    Example:
        >>> target_mask([(0, 0), (0, 3), (3, 5), (5, 9)], spans=[(4, 9)]).tolist()
        [0, 0, 1, 1]
    """
    bounds = np.asarray(offsets, dtype=np.int64).reshape(-1, 2)
    mask = np.zeros(len(bounds), dtype=np.int32)
    for start, end in spans:
        mask |= (bounds[:, 1] > start) & (bounds[:, 0] < end)
    return mask


def _checked_length(tokenizer: Tokenizer, text: str, source: str, max_len: int | None) -> None:
    """Refuse a text that cannot fit ``max_len`` tokens before spending time tokenizing it."""
    if max_len is None or len(text) <= max_len * tokenizer.max_token_chars:
        return
    fewest = tokenizer.fewest_tokens(text)
    if fewest > max_len:
        raise ValueError(
            f"{source or 'record'} is {len(text):,} characters long, at least {fewest:,} "
            f"tokens, more than the maximum of {max_len}; shorten or drop it, {TOO_LONG_ADVICE}"
        )


def encode_record(tokenizer: Tokenizer, record: Record, max_len: int | None = None) -> Example:
    """Tokenize one instruction record (see ``templates`` for how it is rendered): the ids
    of the whole rendered text, and ``loss_mask`` 1 on the target tokens.

    With ``max_len``, a record too long to fit in ``max_len`` tokens is refused from its
    length in characters, before tokenizing (see ``Tokenizer.fewest_tokens``).

    Example:
        >>> from jpeft import assets
        >>> tok = Tokenizer.from_dir(assets.path("tiny-llama"))
        >>> ex = encode_record(tok, Record(prompt="Sort: 3 1", response="1 3"))
        >>> tok.decode(ex.input_ids[ex.loss_mask == 1], skip_special=False)
        ' 1 3 </s>'
    """
    rendered = render_record(tokenizer, record)
    _checked_length(tokenizer, rendered.text, record.source, max_len)
    ids, offsets = tokenizer.encode_offsets(rendered.text, rendered.add_special_tokens)
    mask = target_mask(offsets, rendered.targets)
    if rendered.add_eos and tokenizer.eos_id is not None:
        if ids[-1:] != [tokenizer.eos_id]:  # (unless the post-processor added it)
            ids, mask = [*ids, tokenizer.eos_id], np.append(mask, 0)
        mask[-1] = 1
    if mask.size:
        mask[0] = 0  # nothing precedes the first token
    if not mask.any():
        raise ValueError(f"{record.source or 'record'}: the response renders to no tokens")
    return Example(np.array(ids), mask, source=record.source)


def encode_records(
    tokenizer: Tokenizer,
    records: Sequence[Record],
    max_len: int | None = None,
    truncate: bool = False,
) -> list[Example]:
    """Tokenized examples of ``records``: ``encode_record`` for instruction records, and
    for text records (continued pre-training) ``corpus_examples`` pieces of at most
    ``max_len`` tokens with the loss on every token.

    With ``max_len``, instruction examples are length-checked as in ``fit_length``; a record
    that cannot fit is refused before it is tokenized, unless ``truncate``.

    Example:
        >>> from jpeft import assets
        >>> tok = Tokenizer.from_dir(assets.path("tiny-llama"))
        >>> from jpeft.train.data import read_records
        >>> records = read_records(assets.path("data/eval.jsonl"))
        >>> examples = encode_records(tok, records, max_len=64)
        >>> len(examples) == len(records)
        True
    """
    texts = [r for r in records if r.kind == "text"]
    if texts and len(texts) != len(records):
        raise ValueError(
            f"{texts[0].source}: text records cannot be mixed with instruction records"
        )
    if texts:
        if max_len is None:
            raise ValueError("text records need max_len: they are cut into pieces of that length")
        return corpus_examples(
            tokenizer, [r.text for r in texts], max_len, sources=[r.source for r in texts]
        )
    check = None if truncate else max_len
    examples = [encode_record(tokenizer, r, check) for r in records]
    return examples if max_len is None else fit_length(examples, max_len, truncate)


def generation_prompt(tokenizer: Tokenizer, record: Record) -> list[int]:
    """Token ids a model continues to produce the record's (last) response: the rendered
    text before its last target, tokenized on its own. For a chat template this is
    transformers' ``apply_chat_template(messages_before_it, add_generation_prompt=True,
    tokenize=True)``; without one, ``tokenizer(prompt)["input_ids"]``.

    Example:
        >>> from jpeft import assets
        >>> tok = Tokenizer.from_dir(assets.path("tiny-llama"))
        >>> ids = generation_prompt(tok, Record(prompt="Sort: 3 1", response="1 3"))
        >>> tok.decode(ids, skip_special=False)
        '<s>[INST] Sort: 3 1 [/INST]'
    """
    rendered = render_record(tokenizer, record)
    return tokenizer.encode(rendered.prompt, rendered.add_special_tokens)
