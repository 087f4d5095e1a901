"""The Tokenizer wrapper: same ids, text and chat rendering as transformers' AutoTokenizer."""

from pathlib import Path

import pytest

from jpeft.models.tokenizer import Tokenizer

TOKENIZER_DIR = Path(__file__).resolve().parents[1] / "assets" / "tiny-llama"
TEXTS = [
    "Once upon a time, there was a small cat called Mia.",
    "Sort the digits: 9 0 4 4 1",
    "  leading spaces, tabs\tand\n\nnewlines 123456 ünïcödé 😀 [INST] x [/INST]",
    "<s>special</s> tokens <pad> inside",
    "",
]
CHATS = [
    [{"role": "user", "content": "hi"}],
    [{"role": "user", "content": " hi "}, {"role": "assistant", "content": "hello\n"}],
    [
        {"role": "system", "content": "Answer with digits."},
        {"role": "user", "content": "two plus two"},
        {"role": "assistant", "content": "4"},
        {"role": "user", "content": "and three?"},
    ],
]


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.from_dir(TOKENIZER_DIR)


@pytest.fixture(scope="module")
def hf_tok():
    import transformers

    return transformers.AutoTokenizer.from_pretrained(TOKENIZER_DIR)


def test_special_tokens(tok, hf_tok):
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (1, 2, 3)
    assert (hf_tok.bos_token_id, hf_tok.eos_token_id, hf_tok.pad_token_id) == (1, 2, 3)
    assert tok.vocab_size == len(hf_tok)


@pytest.mark.parametrize("text", TEXTS)
def test_encode_decode_match_transformers(tok, hf_tok, text):
    assert tok.encode(text) == hf_tok(text)["input_ids"]
    plain = hf_tok(text, add_special_tokens=False)["input_ids"]
    assert tok.encode(text, add_special_tokens=False) == plain
    ids = [*tok.encode(text), tok.eos_id]
    for skip in (True, False):
        assert tok.decode(ids, skip_special=skip) == hf_tok.decode(ids, skip_special_tokens=skip)
    assert tok.encode_batch([text, text]) == [tok.encode(text)] * 2


def test_round_trip_is_lossless(tok):
    for text in TEXTS[:3]:
        assert tok.decode(tok.encode(text)) == text


def test_digits_are_single_tokens(tok):
    pieces = [tok.decode([i]) for i in tok.encode("x 2024 and 7", add_special_tokens=False)]
    assert pieces == ["x", " 2", "0", "2", "4", " and", " 7"]


@pytest.mark.parametrize("messages", CHATS)
@pytest.mark.parametrize("gen", [False, True])
def test_chat_template_matches_transformers(tok, hf_tok, messages, gen):
    ours = tok.apply_chat_template(messages, add_generation_prompt=gen)
    theirs = hf_tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen)
    assert ours == theirs


def test_llama2_convention(tok):
    assert tok.apply_chat_template(CHATS[2]) == (
        "<s>[INST] <<SYS>>\nAnswer with digits.\n<</SYS>>\n\ntwo plus two [/INST] 4 </s>"
        "<s>[INST] and three? [/INST]"
    )


def test_llama2_roles_must_alternate(tok):
    bad = [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]
    with pytest.raises(ValueError, match="alternate"):
        tok.apply_chat_template(bad)


def test_errors(tmp_path, tok):
    with pytest.raises(FileNotFoundError, match=r"no tokenizer.json in .*tokenizer.json"):
        Tokenizer.from_dir(tmp_path)
    with pytest.raises(ValueError, match="no chat_template"):
        Tokenizer(tok.backend).apply_chat_template(CHATS[0])
    with pytest.raises(ValueError, match="not in the tokenizer's vocabulary"):
        Tokenizer(tok.backend, bos_token="<|begin_of_text|>")
    with pytest.raises(ValueError, match="expected a mapping"):
        tok.apply_chat_template(["hi"])
