"""Token ids equal transformers' (PreTrainedTokenizerFast over the same files) for a LLaMA-2
style Metaspace tokenizer (prepend_scheme="first") and a LLaMA-3 style byte-level BPE: plain
text, chat templates, and what the data pipeline, ``generate`` and ``eval`` feed the model."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import tiny_config
from tokenizer_utils import CHATS as CHATS_BY_NAME
from tokenizer_utils import hf_tokenizer, llama2_style, llama3_style

from jpeft.models.tokenizer import Tokenizer
from jpeft.train import commands, data
from jpeft.train.evaluate import Evaluator
from jpeft.train.sharding import make_mesh

TEXTS = [
    "Reverse the words: hello world",
    " Reverse the words",
    "Sort the digits: 3 1 2",
    "  leading spaces, tabs\tand\n\nnewlines 1234567",
    "ünïcödé 😀 and <s> or </s> or <|eot_id|> inside",
    "",
]
CHATS = [CHATS_BY_NAME["system, two turns"], CHATS_BY_NAME["three turns"]]  # end with answers
STYLES = {"llama2": llama2_style, "llama3": llama3_style}


@pytest.fixture(scope="module", params=list(STYLES))
def pair(request, tmp_path_factory):
    """(jpeft's Tokenizer, transformers' tokenizer) over one tokenizer directory."""
    path = STYLES[request.param](tmp_path_factory.mktemp(request.param))
    return Tokenizer.from_dir(path), hf_tokenizer(path)


@pytest.fixture(scope="module", params=list(STYLES))
def plain(request, tmp_path_factory):
    """The same tokenizers without a chat template."""
    path = STYLES[request.param](tmp_path_factory.mktemp(request.param), chat_template=None)
    return Tokenizer.from_dir(path), hf_tokenizer(path)


@pytest.mark.parametrize("text", TEXTS)
def test_text_ids_equal_transformers(pair, text):
    tok, hf = pair
    assert tok.encode(text) == hf(text)["input_ids"]
    assert (
        tok.encode(text, add_special_tokens=False)
        == hf(text, add_special_tokens=False)["input_ids"]
    )
    assert tok.encode_batch([text, "x"]) == hf([text, "x"])["input_ids"]


def test_first_word_splits_as_transformers(tmp_path):
    """BOS is an id, not the text "<s>": Metaspace 'first' then prefixes the first word."""
    path = llama2_style(tmp_path)
    tok, hf = Tokenizer.from_dir(path), hf_tokenizer(path)
    ids = tok.encode("Reverse the words")
    assert hf.convert_ids_to_tokens(ids)[1].startswith("▁")
    assert ids != tok.encode("<s>Reverse the words", add_special_tokens=False)


@pytest.mark.parametrize("chat", CHATS)
@pytest.mark.parametrize("gen", [False, True])
def test_chat_ids_equal_transformers(pair, chat, gen):
    tok, hf = pair
    ids = tok.apply_chat_template(chat, add_generation_prompt=gen, tokenize=True)
    assert ids == hf.apply_chat_template(chat, add_generation_prompt=gen)["input_ids"]


@pytest.mark.parametrize("chat", CHATS)
def test_pipeline_ids_equal_transformers(pair, chat):
    """Training ids are the whole conversation; the generation prompt is the conversation up
    to the last assistant turn with the generation header, both tokenized as transformers."""
    tok, hf = pair
    example = data.encode_record(tok, data.Record(messages=chat))
    assert example.input_ids.tolist() == hf.apply_chat_template(chat)["input_ids"]
    prompt = hf.apply_chat_template(chat[:-1], add_generation_prompt=True)["input_ids"]
    assert data.generation_prompt(tok, data.Record(messages=chat)) == prompt
    pair_record = data.Record(prompt=chat[-2]["content"], response=chat[-1]["content"])
    assert (
        data.encode_record(tok, pair_record).input_ids.tolist()
        == hf.apply_chat_template(chat[-2:])["input_ids"]
    )


def test_without_template_ids_are_tokenizer_text(plain):
    """No chat template: the prompt is ``tokenizer(prompt)``, the example is
    ``tokenizer(prompt + response)`` then EOS."""
    tok, hf = plain
    record = data.Record(prompt="Reverse the words: hello world =", response=" world hello")
    assert data.generation_prompt(tok, record) == hf(record.prompt)["input_ids"]
    example = data.encode_record(tok, record)
    full = hf(record.prompt + record.response)["input_ids"] + [hf.eos_token_id]
    assert example.input_ids.tolist() == full
    targets = hf.decode(example.input_ids[example.loss_mask == 1])
    assert targets.strip() == "world hello" + hf.eos_token


def _model(tok: Tokenizer) -> commands.Model:
    cfg = tiny_config(vocab_size=tok.vocab_size, max_position_embeddings=256)
    return commands.Model("unused", cfg, tok, None, {})


@pytest.mark.parametrize("templated", [True, False])
@pytest.mark.parametrize("raw", [False, True])
def test_generate_feeds_transformers_ids(pair, plain, templated, raw, monkeypatch):
    """``jpeft generate`` (chat template or not, --raw or not) left-pads transformers' ids."""
    tok, hf = pair if templated else plain
    seen = {}

    def fake_generate(params, cfg, ids, mask, **kwargs):
        seen["ids"], seen["mask"] = np.asarray(ids), np.asarray(mask)
        raise StopIteration

    monkeypatch.setattr(commands.gen, "generate", fake_generate)
    prompts = ["Reverse the words: hello world", "Sort the digits: 3 1 2"]
    with pytest.raises(StopIteration):
        commands.generate(_model(tok), prompts, raw=raw)
    if templated and not raw:
        chats = [[{"role": "user", "content": p}] for p in prompts]
        expected = [hf.apply_chat_template(c, add_generation_prompt=True) for c in chats]
    else:
        expected = [hf(p) for p in prompts]
    for row, encoding in enumerate(expected):
        assert seen["ids"][row][seen["mask"][row] == 1].tolist() == encoding["input_ids"]


def test_eval_prompts_are_transformers_ids(pair):
    tok, hf = pair
    records = [data.Record(messages=chat) for chat in CHATS]
    examples = data.encode_records(tok, records, max_len=256)
    evaluator = Evaluator(
        tiny_config(vocab_size=tok.vocab_size, max_position_embeddings=256),
        tok,
        examples,
        records,
        mesh=make_mesh("data=-1"),
        batch_size=2,
        seq_len=256,
    )
    expected = [
        hf.apply_chat_template(chat[:-1], add_generation_prompt=True)["input_ids"] for chat in CHATS
    ]
    assert evaluator.prompts == expected


@pytest.mark.parametrize(
    "config", [{"add_bos_token": False}, {"add_eos_token": True}, {"add_bos_token": True}]
)
def test_tokenizer_json_decides_bos_and_eos_as_transformers(tmp_path, config):
    """transformers 5 ignores add_bos_token/add_eos_token when tokenizer.json exists."""
    path = llama2_style(tmp_path, **config)
    tok, hf = Tokenizer.from_dir(path), hf_tokenizer(path)
    assert tok.encode("BOS or not") == hf("BOS or not")["input_ids"]


def test_without_post_processor_no_bos(tmp_path):
    path = llama2_style(tmp_path, chat_template=None)
    raw = json.loads((path / "tokenizer.json").read_text())
    (path / "tokenizer.json").write_text(json.dumps({**raw, "post_processor": None}))
    tok, hf = Tokenizer.from_dir(path), hf_tokenizer(path)
    assert tok.encode("no BOS") == hf("no BOS")["input_ids"]
    assert tok.encode("no BOS")[0] != tok.bos_id
    record = data.Record(prompt="no BOS =", response=" ok")
    assert data.generation_prompt(tok, record) == hf(record.prompt)["input_ids"]


def test_named_special_token_in_vocab_is_split_off(tmp_path):
    """A config special token that tokenizer.json has only as a plain vocabulary entry is
    split off as a special token, as transformers does."""
    path = llama3_style(tmp_path, pad_token="Ġworld")
    tok, hf = Tokenizer.from_dir(path), hf_tokenizer(path)
    text = "hello Ġworld and world"
    assert tok.encode(text) == hf(text)["input_ids"]


def test_truncation_and_padding_in_tokenizer_json_are_off_as_in_transformers(tmp_path):
    path = llama3_style(tmp_path)
    raw = json.loads((path / "tokenizer.json").read_text())
    raw["truncation"] = {
        "direction": "Right",
        "max_length": 3,
        "strategy": "LongestFirst",
        "stride": 0,
    }
    raw["padding"] = {
        "strategy": {"Fixed": 32},
        "direction": "Right",
        "pad_to_multiple_of": None,
        "pad_id": 0,
        "pad_type_id": 0,
        "pad_token": "<|end_of_text|>",
    }
    (path / "tokenizer.json").write_text(json.dumps(raw))
    tok, hf = Tokenizer.from_dir(path), hf_tokenizer(path)
    text = "Sort the digits: 3 1 2"
    assert tok.encode(text) == hf(text)["input_ids"]
    assert len(tok.encode(text)) > 3
