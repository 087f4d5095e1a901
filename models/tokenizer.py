"""A Hugging Face tokenizer directory (``tokenizer.json`` + ``tokenizer_config.json``) that
gives the token ids transformers gives.

``encode(text)`` equals transformers' ``tokenizer(text)["input_ids"]`` (a
``PreTrainedTokenizerFast`` over the same files): special tokens such as BOS are added as ids
by the post-processor of ``tokenizer.json``, never as text, so a Metaspace tokenizer with
``prepend_scheme="first"`` splits the first word as transformers does. As in transformers 5,
that post-processor alone decides which special tokens are added: ``add_bos_token`` and
``add_eos_token`` in ``tokenizer_config.json`` are ignored when there is a ``tokenizer.json``
(transformers' ``_from_pretrained`` drops them). ``apply_chat_template(..., tokenize=True)``
renders the conversation (see :mod:`jpeft.models.chat_template`) and encodes it with
``add_special_tokens=False``, because the template writes its own BOS as text, as
transformers does.
"""

from __future__ import annotations

import copy
import json
import os
from collections.abc import Sequence
from typing import Any

import tokenizers

from jpeft.models import chat_template
from jpeft.models.chat_template import Message, RenderedChat

# transformers' SPECIAL_TOKENS_ATTRIBUTES that LLaMA-family tokenizers use; chat templates
# see the ones a tokenizer defines.
SPECIAL_TOKENS = ("bos_token", "eos_token", "unk_token", "pad_token")
_WHITESPACE = tuple(chr(i) for i in range(0x3001) if chr(i).isspace())  # all of str.isspace


def _token_string(value: Any, name: str, path: str) -> str | None:
    """A special token from tokenizer_config.json: a string, an AddedToken dict, or None."""
    if isinstance(value, dict):
        value = value.get("content")
    if value is not None and not isinstance(value, str):
        raise ValueError(f"{path}: {name} must be a string, found {value!r}")
    return value


def _read_json(path: str) -> Any:
    with open(path, encoding="utf-8") as f:
        try:
            return json.load(f)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{path}: not valid JSON ({e})") from e


def _load_chat_template(directory: str, config: dict[str, Any], path: str) -> str | None:
    template = config.get("chat_template")
    if isinstance(template, list):  # named templates: [{"name": ..., "template": ...}]
        template = {t.get("name"): t.get("template") for t in template}.get("default")
    jinja_file = os.path.join(directory, "chat_template.jinja")
    if template is None and os.path.isfile(jinja_file):
        with open(jinja_file, encoding="utf-8") as f:
            return f.read()
    if template is not None and not isinstance(template, str):
        raise ValueError(f"{path}: chat_template must be a string, found {type(template).__name__}")
    return template


def _missing_tokenizer_message(directory: str) -> str:
    found = [n for n in ("tokenizer.model", "vocab.json") if os.path.isfile(f"{directory}/{n}")]
    hint = (
        f" It has {found[0]}: write a tokenizer.json with transformers "
        "(AutoTokenizer.from_pretrained(d).save_pretrained(d))."
        if found
        else ""
    )
    path = os.path.join(directory, "tokenizer.json")
    return f"no tokenizer.json in {directory!r} (looked for {path!r}).{hint}"


class Tokenizer:
    """Encode, decode and chat-format text as transformers' tokenizer of the same files does.

    Args:
        backend: the ``tokenizers.Tokenizer`` (from ``tokenizer.json``).
        bos_token, eos_token, unk_token, pad_token: the named special tokens (strings in
            the vocabulary), as in ``tokenizer_config.json``.
        chat_template: the jinja chat template, or None.
        source: the directory the files came from (named in errors).

    Example:
        >>> from jpeft import assets
        >>> tok = Tokenizer.from_dir(assets.path("tiny-llama"))
        >>> ids = tok.encode("hello world")            # as transformers: BOS id, then the text
        >>> ids[0] == tok.bos_id, tok.decode(ids)
        (True, 'hello world')
    """

    def __init__(
        self,
        backend: tokenizers.Tokenizer,
        *,
        bos_token: str | None = None,
        eos_token: str | None = None,
        unk_token: str | None = None,
        pad_token: str | None = None,
        chat_template: str | None = None,
        source: str | None = None,
    ) -> None:
        self.source = source
        self.bos_token, self.eos_token, self.pad_token = bos_token, eos_token, pad_token
        # jpeft never emits unk: one missing from the vocabulary is dropped, not refused
        self.unk_token = unk_token if backend.token_to_id(unk_token or "") is not None else None
        self.chat_template = chat_template
        self.backend = backend
        self.bos_id = self._id_of(bos_token, "bos_token")
        self.eos_id = self._id_of(eos_token, "eos_token")
        self.pad_id = self._id_of(pad_token, "pad_token")
        self.backend = self._configured(backend)
        self._max_token_chars: int | None = None

    def _where(self) -> str:
        return f"{self.source}: " if self.source else ""

    def _id_of(self, token: str | None, name: str) -> int | None:
        if token is None:
            return None
        token_id = self.backend.token_to_id(token)
        if token_id is None:
            raise ValueError(
                f"{self._where()}{name} {token!r} is not in the tokenizer's vocabulary"
            )
        return token_id

    def _configured(self, backend: tokenizers.Tokenizer) -> tokenizers.Tokenizer:
        """The backend as transformers' ``TokenizersBackend.__init__`` sets it up: no
        truncation or padding, and the named special tokens split off as special tokens."""
        added = {t.content for t in backend.get_added_tokens_decoder().values()}
        named = [t for t in self.special_tokens.values() if t not in added]
        if not (named or backend.truncation or backend.padding):
            return backend
        backend = copy.deepcopy(backend)  # never change the caller's tokenizer
        backend.no_truncation()
        backend.no_padding()
        if named:
            backend.add_special_tokens(
                [tokenizers.AddedToken(t, special=True, normalized=False) for t in named]
            )
        return backend

    @classmethod
    def from_dir(cls, directory: str | os.PathLike) -> Tokenizer:
        """Load ``tokenizer.json`` (required) and ``tokenizer_config.json`` (optional; its
        ``chat_template``, or a ``chat_template.jinja`` file) from a directory.

        Raises:
            FileNotFoundError: no ``tokenizer.json`` (naming what the directory has instead).
            ValueError: a corrupt ``tokenizer.json`` or ``tokenizer_config.json`` (naming
                the file), a special token missing from the vocabulary.

        Example:
            >>> from jpeft import assets
            >>> tok = Tokenizer.from_dir(assets.path("tiny-llama"))
            >>> tok.bos_id, tok.eos_id, tok.pad_id
            (1, 2, 3)
        """
        directory = os.fspath(directory)
        path = os.path.join(directory, "tokenizer.json")
        if not os.path.isfile(path):
            raise FileNotFoundError(_missing_tokenizer_message(directory))
        try:
            backend = tokenizers.Tokenizer.from_file(path)
        except Exception as e:  # tokenizers raises a bare Exception for any bad file
            raise ValueError(f"{path}: not a valid tokenizer.json ({e})") from e
        config: dict[str, Any] = {}
        config_path = os.path.join(directory, "tokenizer_config.json")
        if os.path.isfile(config_path):
            config = _read_json(config_path)
            if not isinstance(config, dict):
                raise ValueError(
                    f"{config_path}: expected a JSON object, found {type(config).__name__}"
                )
        tokens = {n: _token_string(config.get(n), n, config_path) for n in SPECIAL_TOKENS}
        return cls(
            backend,
            **tokens,
            chat_template=_load_chat_template(directory, config, config_path),
            source=directory,
        )

    @property
    def special_tokens(self) -> dict[str, str]:
        """``{"bos_token": "<s>", ...}``: the named special tokens this tokenizer defines."""
        values = (self.bos_token, self.eos_token, self.unk_token, self.pad_token)
        return {k: v for k, v in zip(SPECIAL_TOKENS, values, strict=True) if v is not None}

    @property
    def vocab_size(self) -> int:
        """Number of token ids, added tokens included."""
        return self.backend.get_vocab_size(with_added_tokens=True)

    @property
    def max_token_chars(self) -> int:
        """Length of the longest token string: a token never covers more characters of
        (normalized, non-space) input, which bounds the token count from below before
        tokenizing (see :meth:`fewest_tokens`)."""
        if self._max_token_chars is None:
            vocab = self.backend.get_vocab(with_added_tokens=True)
            self._max_token_chars = max((len(t) for t in vocab), default=1)
        return self._max_token_chars

    def fewest_tokens(self, text: str) -> int:
        """A lower bound on ``len(encode(text))``, computed without tokenizing: the text's
        normalized non-space characters over :attr:`max_token_chars`. Cheap on any length.

        Example:
            >>> from jpeft import assets
            >>> tok = Tokenizer.from_dir(assets.path("tiny-llama"))
            >>> tok.fewest_tokens("a " * 5_000) <= len(tok.encode("a " * 5_000))
            True
        """
        if self.backend.normalizer is not None:
            text = self.backend.normalizer.normalize_str(text)
        visible = len(text) - sum(text.count(c) for c in _WHITESPACE)  # C speed on any size
        return -(-visible // self.max_token_chars)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of ``text``: transformers' ``tokenizer(text, add_special_tokens=...)``.

        Special-token strings inside the text (``"<s>"``) become their ids.

        Example:
            >>> from jpeft import assets
            >>> tok = Tokenizer.from_dir(assets.path("tiny-llama"))
            >>> tok.encode("1 2") == [tok.bos_id, *tok.encode("1 2", add_special_tokens=False)]
            True
        """
        return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

    def encode_offsets(
        self, text: str, add_special_tokens: bool = True
    ) -> tuple[list[int], list[tuple[int, int]]]:
        """``(ids, offsets)``: :meth:`encode` plus each token's ``[start, end)`` character
        span in ``text`` (``(0, 0)`` for tokens the post-processor adds).

        Example:
            >>> from jpeft import assets
            >>> tok = Tokenizer.from_dir(assets.path("tiny-llama"))
            >>> tok.encode_offsets("1 2")[1]
            [(0, 0), (0, 1), (1, 3)]
        """
        encoding = self.backend.encode(text, add_special_tokens=add_special_tokens)
        return encoding.ids, encoding.offsets

    def encode_batch(
        self, texts: Sequence[str], add_special_tokens: bool = True
    ) -> list[list[int]]:
        """:meth:`encode` for many texts at once (parallel in the ``tokenizers`` library).

        Example:
            >>> from jpeft import assets
            >>> tok = Tokenizer.from_dir(assets.path("tiny-llama"))
            >>> tok.encode_batch(["1", "1 2"]) == [tok.encode("1"), tok.encode("1 2")]
            True
        """
        encodings = self.backend.encode_batch(list(texts), add_special_tokens=add_special_tokens)
        return [e.ids for e in encodings]

    def decode(self, ids: Sequence[int], skip_special: bool = True) -> str:
        """Text of ``ids``, dropping special tokens unless ``skip_special=False``.

        Example:
            >>> from jpeft import assets
            >>> tok = Tokenizer.from_dir(assets.path("tiny-llama"))
            >>> tok.decode(tok.encode("hi")), tok.decode(tok.encode("hi"), skip_special=False)
            ('hi', '<s>hi')
        """
        return self.backend.decode([int(i) for i in ids], skip_special_tokens=skip_special)

    def render_chat(
        self, messages: Sequence[Message], add_generation_prompt: bool = False
    ) -> RenderedChat:
        """The conversation rendered with this tokenizer's chat template, with the spans of
        its ``{% generation %}`` blocks (see :func:`jpeft.models.chat_template.render`).

        Example:
            >>> from jpeft import assets
            >>> tok = Tokenizer.from_dir(assets.path("tiny-llama"))
            >>> tok.render_chat([{"role": "user", "content": "hi"}], True).text
            '<s>[INST] hi [/INST]'
        """
        if self.chat_template is None:
            raise ValueError(
                f"{self._where()}this tokenizer has no chat_template (tokenizer_config.json "
                "'chat_template' or chat_template.jinja); chat messages cannot be rendered"
            )
        try:
            return chat_template.render(
                self.chat_template,
                messages,
                add_generation_prompt=add_generation_prompt,
                special_tokens=self.special_tokens,
            )
        except ValueError as e:
            raise ValueError(f"{self._where()}{e}") from e

    def apply_chat_template(
        self,
        messages: Sequence[Message],
        add_generation_prompt: bool = False,
        tokenize: bool = False,
    ) -> str | list[int]:
        """transformers' ``apply_chat_template``: the rendered text, or with ``tokenize=True``
        its ids (encoded with ``add_special_tokens=False``: the template writes BOS itself).

        Example:
            >>> from jpeft import assets
            >>> tok = Tokenizer.from_dir(assets.path("tiny-llama"))
            >>> chat = [{"role": "user", "content": "hi"}]
            >>> tok.apply_chat_template(chat, add_generation_prompt=True)
            '<s>[INST] hi [/INST]'
            >>> ids = tok.apply_chat_template(chat, add_generation_prompt=True, tokenize=True)
            >>> ids == tok.encode("<s>[INST] hi [/INST]", add_special_tokens=False)
            True
        """
        text = self.render_chat(messages, add_generation_prompt).text
        return self.encode(text, add_special_tokens=False) if tokenize else text
