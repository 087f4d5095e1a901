"""Train the bundled byte-level BPE tokenizer (deterministic, no downloads).

    python scripts/make_tokenizer.py    # reads assets/data, writes assets/tiny-llama/tokenizer*

Trained with the ``tokenizers`` library on the pretraining corpus plus the rendered training
examples of the instruction task. Byte-level, so every string round-trips; digits are always
single tokens (a space may precede one), which keeps numbers easy for a tiny model. Special
tokens: ``<unk>`` 0, ``<s>`` 1 (BOS), ``</s>`` 2 (EOS), ``<pad>`` 3. The chat template is the
LLaMA-2 ``[INST]`` convention. ``transformers.AutoTokenizer.from_pretrained`` loads the output.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Iterator

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from jpeft.models.chat_template import render

# The LLaMA-2 [INST] convention (meta-llama/Llama-2-7b-chat-hf's, with `trim` on every turn).
LLAMA2_CHAT_TEMPLATE = (
    "{% if messages[0]['role'] == 'system' %}"
    "{% set system = messages[0]['content'] | trim %}{% set loop_messages = messages[1:] %}"
    "{% else %}{% set system = '' %}{% set loop_messages = messages %}{% endif %}"
    "{% for message in loop_messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('LLaMA-2 chat roles must alternate user/assistant after an optional"
    " system message') }}{% endif %}"
    "{% if message['role'] == 'user' %}{% set content = message['content'] | trim %}"
    "{% if loop.index0 == 0 and system %}"
    "{% set content = '<<SYS>>\\n' + system + '\\n<</SYS>>\\n\\n' + content %}{% endif %}"
    "{{ bos_token + '[INST] ' + content + ' [/INST]' }}"
    "{% else %}{{ ' ' + message['content'] | trim + ' ' + eos_token }}{% endif %}"
    "{% endfor %}"
)
NO_SPECIAL_TOKENS = {"bos_token": "", "eos_token": ""}
SPECIAL_TOKENS = ("<unk>", "<s>", "</s>", "<pad>")
# GPT-2's split pattern, except that a digit never joins another digit.
SPLIT_PATTERN = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"


def build_tokenizer() -> Tokenizer:
    """An untrained byte-level BPE tokenizer with the bundled pre-tokenizer and BOS processor."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(SPLIT_PATTERN), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)]
    )
    return tok


def training_texts(data_dir: str) -> Iterator[str]:
    """Corpus documents, then each training example rendered with the chat template."""
    with open(os.path.join(data_dir, "corpus.txt"), encoding="utf-8") as f:
        yield from f.read().split("\n\n")
    with open(os.path.join(data_dir, "train.jsonl"), encoding="utf-8") as f:
        for line in f:
            record = json.loads(line)
            messages = [
                {"role": "user", "content": record["prompt"]},
                {"role": "assistant", "content": record["response"]},
            ]
            # without BOS/EOS text: the trainer must not learn merges across special tokens
            yield render(LLAMA2_CHAT_TEMPLATE, messages, special_tokens=NO_SPECIAL_TOKENS).text


def tokenizer_config() -> dict:
    """tokenizer_config.json for our ``Tokenizer`` and for transformers."""
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<s>",
        "eos_token": "</s>",
        "unk_token": "<unk>",
        "pad_token": "<pad>",
        "add_bos_token": True,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "padding_side": "right",
        "chat_template": LLAMA2_CHAT_TEMPLATE,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="assets/data", help="directory with corpus.txt etc.")
    parser.add_argument("--out", default="assets/tiny-llama", help="output model directory")
    parser.add_argument("--vocab-size", type=int, default=2048)
    args = parser.parse_args()

    tok = build_tokenizer()
    trainer = trainers.BpeTrainer(
        vocab_size=args.vocab_size,
        min_frequency=2,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(training_texts(args.data), trainer=trainer)
    ids = [tok.token_to_id(t) for t in SPECIAL_TOKENS]
    if ids != list(range(len(SPECIAL_TOKENS))):
        raise RuntimeError(f"special tokens {SPECIAL_TOKENS} got ids {ids}, expected 0..3")

    os.makedirs(args.out, exist_ok=True)
    tok.save(os.path.join(args.out, "tokenizer.json"))
    special = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<pad>"}
    for name, content in (
        ("tokenizer_config.json", tokenizer_config()),
        ("special_tokens_map.json", special),
    ):
        with open(os.path.join(args.out, name), "w", encoding="utf-8") as f:
            json.dump(content, f, indent=2, sort_keys=True)
            f.write("\n")
    print(f"wrote {args.out}: vocab {tok.get_vocab_size()}")


if __name__ == "__main__":
    main()
