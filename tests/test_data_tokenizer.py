"""The Tokenizer wrapper: same ids, text and chat rendering as transformers' AutoTokenizer."""

from pathlib import Path

import pytest

from jpeft.models.tokenizer import (
    LLAMA2_CHAT_TEMPLATE,
    LLAMA3_CHAT_TEMPLATE,
    Tokenizer,
    render_chat_template,
)

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
    assert tok.encode(text, add_bos=False) == hf_tok(text, add_special_tokens=False)["input_ids"]
    ids = tok.encode(text, add_eos=True)
    assert ids[-1] == tok.eos_id
    for skip in (True, False):
        assert tok.decode(ids, skip_special=skip) == hf_tok.decode(ids, skip_special_tokens=skip)
    assert tok.encode_batch([text, text]) == [tok.encode(text)] * 2


def test_round_trip_is_lossless(tok):
    for text in TEXTS[:3]:
        assert tok.decode(tok.encode(text)) == text


def test_digits_are_single_tokens(tok):
    pieces = [tok.decode([i]) for i in tok.encode("x 2024 and 7", add_bos=False)]
    assert pieces == ["x", " 2", "0", "2", "4", " and", " 7"]


@pytest.mark.parametrize("messages", CHATS)
@pytest.mark.parametrize("gen", [False, True])
def test_chat_template_matches_transformers(tok, hf_tok, messages, gen):
    ours = tok.apply_chat_template(messages, add_generation_prompt=gen)
    theirs = hf_tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen)
    assert ours == theirs


@pytest.mark.parametrize("template", [LLAMA2_CHAT_TEMPLATE, LLAMA3_CHAT_TEMPLATE])
@pytest.mark.parametrize("messages", CHATS)
@pytest.mark.parametrize("gen", [False, True])
def test_builtin_renderers_equal_jinja(template, messages, gen):
    kwargs = dict(bos_token="<s>", eos_token="</s>", add_generation_prompt=gen)
    jinja = render_chat_template(template, messages, engine="jinja", **kwargs)
    builtin = render_chat_template(template, messages, engine="builtin", **kwargs)
    assert jinja == builtin


def test_llama_conventions():
    chat = CHATS[2]
    assert render_chat_template(LLAMA2_CHAT_TEMPLATE, chat, bos_token="<s>", eos_token="</s>") == (
        "<s>[INST] <<SYS>>\nAnswer with digits.\n<</SYS>>\n\ntwo plus two [/INST] 4 </s>"
        "<s>[INST] and three? [/INST]"
    )
    llama3 = render_chat_template(
        LLAMA3_CHAT_TEMPLATE, chat[1:3], bos_token="<|begin_of_text|>", add_generation_prompt=True
    )
    assert llama3 == (
        "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\ntwo plus two<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n4<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
    )


@pytest.mark.parametrize("engine", ["jinja", "builtin"])
def test_llama2_roles_must_alternate(engine):
    bad = [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]
    with pytest.raises(ValueError, match="alternate"):
        render_chat_template(LLAMA2_CHAT_TEMPLATE, bad, engine=engine)


def test_errors(tmp_path, tok):
    with pytest.raises(FileNotFoundError, match=r"no tokenizer.json in .*tokenizer.json"):
        Tokenizer.from_dir(tmp_path)
    with pytest.raises(ValueError, match="no chat_template"):
        Tokenizer(tok.backend).apply_chat_template(CHATS[0])
    with pytest.raises(ValueError, match="neither the LLaMA-2"):
        render_chat_template("{{ messages }}", CHATS[0], engine="builtin")
    with pytest.raises(ValueError, match="not in the tokenizer's vocabulary"):
        Tokenizer(tok.backend, bos_token="<|begin_of_text|>")
    with pytest.raises(ValueError, match="content"):
        tok.apply_chat_template([{"role": "user"}])
