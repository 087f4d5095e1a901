"""Tiny LLaMA-2 and LLaMA-3 style tokenizer directories, trained here on a few lines, and the
transformers tokenizer over the same files (the oracle of the token-id tests)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import transformers
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

FIXTURES = Path(__file__).resolve().parent / "fixtures"
LLAMA2_TEMPLATE = (FIXTURES / "llama-2-chat.jinja").read_text()
LLAMA31_TEMPLATE = (FIXTURES / "llama-3.1-instruct.jinja").read_text()

LINES = [
    "Reverse the words: hello world",
    "Sort the digits: 3 1 2 and 9 0 4",
    "Once upon a time there was a small cat called Mia.",
    "You are a helpful assistant. Answer briefly!",
    "The answer is 42, or maybe 1234567.",
    "[INST] question [/INST] answer",
    "  leading spaces, tabs\tand\n\nnewlines",
]
# Conversations with system prompts and several turns.
CHATS = {
    "system, two turns": [
        {"role": "system", "content": "You are a helpful assistant.\n"},
        {"role": "user", "content": "Sort the digits: 3 1 2"},
        {"role": "assistant", "content": "1 2 3"},
        {"role": "user", "content": " Reverse the words: hello world "},
        {"role": "assistant", "content": "world hello\n"},
    ],
    "three turns": [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hello"},
        {"role": "user", "content": "2 + 2?"},
        {"role": "assistant", "content": "4"},
        {"role": "user", "content": "and 3 + 3?"},
        {"role": "assistant", "content": "6"},
    ],
    "ends with a user turn": [
        {"role": "system", "content": "Answer with digits."},
        {"role": "user", "content": "two plus two"},
    ],
}
# Llama 3's split pattern (meta-llama/Meta-Llama-3-8B tokenizer.json).
LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
LLAMA3_SPECIAL = [
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eot_id|>",
]


def _write(directory: Path, tok: Tokenizer, config: dict[str, Any]) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    tok.save(str(directory / "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", **config}
    (directory / "tokenizer_config.json").write_text(json.dumps(config))
    return directory


def llama2_style(directory: Path, **config: Any) -> Path:
    """A Metaspace (``prepend_scheme="first"``, ``split=False``) BPE with byte fallback, as
    transformers' ``LlamaTokenizer`` builds it, with ``<s>`` from the post-processor and the
    Llama-2-chat template. ``config`` overrides ``tokenizer_config.json`` keys."""
    trainer = trainers.BpeTrainer(
        vocab_size=200, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False
    )
    trained = Tokenizer(models.BPE(unk_token="<unk>"))
    trained.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="first", split=False)
    trained.train_from_iterator(LINES * 2, trainer=trainer)
    saved = json.loads(trained.to_str())["model"]
    vocab = dict(saved["vocab"])
    for byte in range(256):
        vocab.setdefault(f"<0x{byte:02X}>", len(vocab))
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in saved["merges"]]
    tok = Tokenizer(models.BPE(vocab, merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tok.add_special_tokens(["<unk>", "<s>", "</s>"])
    tok.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="first", split=False)
    tok.decoder = decoders.Sequence(
        [
            decoders.Replace("▁", " "),
            decoders.ByteFallback(),
            decoders.Fuse(),
            decoders.Strip(" ", 1, 0),
        ]
    )
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)]
    )
    base = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}
    base |= {"add_bos_token": True, "add_eos_token": False, "chat_template": LLAMA2_TEMPLATE}
    return _write(directory, tok, {**base, **config})


def llama3_style(directory: Path, **config: Any) -> Path:
    """A byte-level BPE with Llama 3's split pattern and special tokens, ``<|begin_of_text|>``
    from the post-processor (no ``add_bos_token`` key, as Llama 3.1's config) and the
    Llama-3.1-Instruct template. ``config`` overrides ``tokenizer_config.json`` keys."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(LLAMA3_SPLIT), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=LLAMA3_SPECIAL,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(LINES * 2, trainer=trainer)
    bos = tok.token_to_id("<|begin_of_text|>")
    tok.post_processor = processors.Sequence(
        [
            processors.ByteLevel(trim_offsets=False),
            processors.TemplateProcessing(
                single="<|begin_of_text|> $A",
                pair="<|begin_of_text|> $A <|begin_of_text|> $B",
                special_tokens=[("<|begin_of_text|>", bos)],
            ),
        ]
    )
    base = {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>"}
    return _write(directory, tok, {**base, "chat_template": LLAMA31_TEMPLATE, **config})


def hf_tokenizer(directory: Path) -> transformers.PreTrainedTokenizerFast:
    """transformers' tokenizer over the directory's files: the oracle."""
    return transformers.PreTrainedTokenizerFast.from_pretrained(str(directory))
