"""Rendering and tokenization: loss only on response tokens, prompts as at generation time."""

from pathlib import Path

import numpy as np
import pytest

from jpeft.models.tokenizer import Tokenizer
from jpeft.train.data import (
    Example,
    Record,
    corpus_examples,
    encode_record,
    fit_length,
    generation_prompt,
    render_record,
)

TOKENIZER_DIR = Path(__file__).resolve().parents[1] / "assets" / "tiny-llama"
LLAMA31_TEMPLATE = (Path(__file__).parent / "fixtures" / "llama-3.1-instruct.jinja").read_text()


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.from_dir(TOKENIZER_DIR)


def _targets(tok, ex):
    return tok.decode(ex.input_ids[ex.loss_mask == 1], skip_special=False)


def test_prompt_response_masks_only_the_response_and_eos(tok):
    ex = encode_record(tok, Record(prompt="Sort the digits: 3 1 2", response="1 2 3"))
    assert ex.input_ids[0] == tok.bos_id and ex.input_ids[-1] == tok.eos_id
    assert _targets(tok, ex) == " 1 2 3 </s>"
    # the targets are one contiguous block at the end
    first = int(np.argmax(ex.loss_mask))
    assert ex.loss_mask[first:].all() and not ex.loss_mask[:first].any()
    prompt = tok.decode(ex.input_ids[:first], skip_special=False)
    assert prompt == "<s>[INST] Sort the digits: 3 1 2 [/INST]"


def test_generation_prompt_is_the_training_prefix(tok):
    record = Record(prompt="Sort the digits: 9 4", response="4 9")
    ex = encode_record(tok, record)
    ids = generation_prompt(tok, record)
    assert ids == ex.input_ids[: len(ids)].tolist()
    assert not ex.loss_mask[: len(ids)].any() and ex.loss_mask[len(ids) :].all()


def test_chat_masks_every_assistant_turn(tok):
    record = Record(
        messages=[
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "hello"},
            {"role": "assistant", "content": "hi there"},
            {"role": "user", "content": "bye"},
            {"role": "assistant", "content": "see you"},
        ]
    )
    rendered = render_record(tok, record)
    assert rendered.text == tok.apply_chat_template(record.messages)
    targets = [rendered.text[s:e] for s, e in rendered.targets]
    assert targets == [" hi there </s>", " see you </s>"]
    ex = encode_record(tok, record)
    assert _targets(tok, ex) == " hi there </s> see you </s>"
    assert tok.decode(generation_prompt(tok, record)).endswith("[INST] bye [/INST]")


def test_llama3_template_masks_content_and_eot(tok):
    llama3 = Tokenizer(
        tok.backend, bos_token="<s>", eos_token="</s>", chat_template=LLAMA31_TEMPLATE
    )
    ex = encode_record(llama3, Record(prompt="2 + 2 =", response="4"))
    assert _targets(llama3, ex) == "4<|eot_id|>"
    prompt = llama3.decode(generation_prompt(llama3, Record(prompt="2 + 2 =", response="4")))
    assert prompt.endswith("<|start_header_id|>assistant<|end_header_id|>\n\n")


def test_without_template_prompt_then_response(tok):
    plain = Tokenizer(tok.backend, bos_token="<s>", eos_token="</s>")
    ex = encode_record(plain, Record(prompt="Q: one plus one? A:", response=" two"))
    assert tok.decode(ex.input_ids, skip_special=False) == "<s>Q: one plus one? A: two</s>"
    assert _targets(plain, ex) == " two</s>"
    with pytest.raises(ValueError, match="no chat_template"):
        encode_record(plain, Record(messages=[{"role": "assistant", "content": "x"}]))


def test_too_long_example_names_index_and_lengths(tok):
    examples = [
        Example(np.arange(5), np.array([0, 0, 1, 1, 1]), source="a.jsonl:1"),
        Example(np.arange(9), np.array([0] * 4 + [1] * 5), source="a.jsonl:2"),
    ]
    with pytest.raises(ValueError, match=r"example 1 \(a.jsonl:2\) has 9 tokens.* 8"):
        fit_length(examples, max_len=8)
    cut = fit_length(examples, max_len=8, truncate=True)
    assert [len(e) for e in cut] == [5, 8] and cut[1].loss_mask.tolist() == [0] * 4 + [1] * 4


def test_example_checks_its_arrays():
    with pytest.raises(ValueError, match="one length"):
        Example(np.arange(3), np.zeros(2))
    with pytest.raises(ValueError, match=r"loss_mask\[0\] must be 0"):
        Example(np.arange(3), np.ones(3))


def test_corpus_pieces_make_every_token_a_target_once(tok):
    docs = ["Once upon a time, there was a cat. " * 10, "1 + 1 = 2"]
    examples = corpus_examples(tok, docs, max_len=16)
    assert all(
        2 <= len(e) <= 16 and e.loss_mask[0] == 0 and e.loss_mask[1:].all() for e in examples
    )
    targets = np.concatenate([e.input_ids[1:] for e in examples]).tolist()
    full = [[*tok.encode(d), tok.eos_id] for d in docs]
    assert targets == full[0][1:] + full[1][1:]
    assert examples[0].input_ids[0] == tok.bos_id
