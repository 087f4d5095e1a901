"""A small wrapper over a Hugging Face ``tokenizer.json`` plus its ``tokenizer_config.json``.

It encodes and decodes with the ``tokenizers`` library, knows the BOS/EOS/PAD ids, and renders
chat conversations with the directory's chat template. The template is run with jinja2 the way
transformers runs it; without jinja2, the two LLaMA conventions are rendered by built-in code:

* LLaMA 2: ``<s>[INST] <<SYS>>\\n{system}\\n<</SYS>>\\n\\n{user} [/INST] {assistant} </s>``,
  one ``<s>[INST] ... [/INST]`` per user turn, no generation header.
* LLaMA 3: ``<|begin_of_text|>`` then per message
  ``<|start_header_id|>{role}<|end_header_id|>\\n\\n{content}<|eot_id|>``; the generation
  prompt is the assistant header.

``LLAMA2_CHAT_TEMPLATE`` and ``LLAMA3_CHAT_TEMPLATE`` are the jinja forms of the same two
conventions; the built-in renderers give exactly what jinja2 gives for them.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import os
from collections.abc import Sequence
from typing import Any

import tokenizers

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

LLAMA3_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'"
    " + message['content'] | trim + '<|eot_id|>' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}"
    "{% endif %}"
)

Message = dict[str, str]


def _check_messages(messages: Sequence[Message]) -> None:
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise ValueError(f"message {i}: expected a dict with a string 'role', found {m!r}")
        if not isinstance(m.get("content"), str):
            raise ValueError(f"message {i}: expected a string 'content', found {m!r}")


def _render_llama2(messages: Sequence[Message], bos: str, eos: str) -> str:
    system, turns = "", list(messages)
    if turns and turns[0]["role"] == "system":
        system, turns = turns[0]["content"].strip(), turns[1:]
    out = []
    for i, m in enumerate(turns):
        expected = "user" if i % 2 == 0 else "assistant"
        if m["role"] != expected:
            raise ValueError(
                f"LLaMA-2 chat roles must alternate user/assistant after an optional system "
                f"message: message {i + len(messages) - len(turns)} is {m['role']!r}, "
                f"expected {expected!r}"
            )
        content = m["content"].strip()
        if m["role"] == "user":
            if i == 0 and system:
                content = f"<<SYS>>\n{system}\n<</SYS>>\n\n{content}"
            out.append(f"{bos}[INST] {content} [/INST]")
        else:
            out.append(f" {content} {eos}")
    return "".join(out)


def _render_llama3(messages: Sequence[Message], bos: str, add_generation_prompt: bool) -> str:
    out = [bos]
    for m in messages:
        out.append(f"<|start_header_id|>{m['role']}<|end_header_id|>\n\n")
        out.append(f"{m['content'].strip()}<|eot_id|>")
    if add_generation_prompt:
        out.append("<|start_header_id|>assistant<|end_header_id|>\n\n")
    return "".join(out)


def _raise_exception(message: str) -> None:
    raise ValueError(message)


@functools.lru_cache(maxsize=16)
def _compile_jinja(template: str) -> Any:
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = _raise_exception
    return env.from_string(template)


def _render_jinja(template: str, messages: Sequence[Message], **context: Any) -> str:
    import jinja2

    try:
        return _compile_jinja(template).render(messages=list(messages), **context)
    except jinja2.TemplateError as e:
        raise ValueError(f"chat template failed to render: {e}") from e


def render_chat_template(
    template: str,
    messages: Sequence[Message],
    *,
    bos_token: str = "",
    eos_token: str = "",
    add_generation_prompt: bool = False,
    engine: str = "auto",
) -> str:
    """Render ``messages`` with a chat ``template`` (a jinja string, as in tokenizer_config.json).

    ``engine`` is ``"jinja"``, ``"builtin"`` (LLaMA-2/LLaMA-3 conventions, recognised by the
    ``[INST]`` or ``<|start_header_id|>`` markers in the template) or ``"auto"`` (jinja2 when it
    is installed).

    Example:
        >>> render_chat_template(LLAMA2_CHAT_TEMPLATE, [{"role": "user", "content": "hi"}],
        ...                      bos_token="<s>", eos_token="</s>", engine="builtin")
        '<s>[INST] hi [/INST]'
    """
    if engine not in ("auto", "jinja", "builtin"):
        raise ValueError(f"engine must be 'auto', 'jinja' or 'builtin', found {engine!r}")
    _check_messages(messages)
    if engine == "auto":
        engine = "jinja" if importlib.util.find_spec("jinja2") else "builtin"
    if engine == "jinja":
        return _render_jinja(
            template,
            messages,
            bos_token=bos_token,
            eos_token=eos_token,
            add_generation_prompt=add_generation_prompt,
        )
    if "<|start_header_id|>" in template:
        return _render_llama3(messages, bos_token, add_generation_prompt)
    if "[INST]" in template:
        return _render_llama2(messages, bos_token, eos_token)
    raise ValueError(
        "this chat template is neither the LLaMA-2 ([INST]) nor the LLaMA-3 "
        "(<|start_header_id|>) convention; install jinja2 to render it"
    )


def _token_string(value: Any) -> str | None:
    """A special token from tokenizer_config.json: a string, an AddedToken dict, or None."""
    if isinstance(value, dict):
        return value.get("content")
    return value


def _load_chat_template(directory: str, config: dict[str, Any]) -> str | None:
    template = config.get("chat_template")
    if isinstance(template, list):  # named templates: [{"name": ..., "template": ...}]
        template = {t.get("name"): t.get("template") for t in template}.get("default")
    jinja_file = os.path.join(directory, "chat_template.jinja")
    if template is None and os.path.exists(jinja_file):
        with open(jinja_file, encoding="utf-8") as f:
            template = f.read()
    return template


class Tokenizer:
    """Encode, decode and chat-format text with a ``tokenizers`` model and its special tokens.

    Example:
        >>> tok = Tokenizer.from_dir("assets/tiny-llama")
        >>> ids = tok.encode("hello world")            # [bos, ...]
        >>> tok.decode(ids)
        'hello world'
    """

    def __init__(
        self,
        backend: tokenizers.Tokenizer,
        *,
        bos_token: str | None = None,
        eos_token: str | None = None,
        pad_token: str | None = None,
        chat_template: str | None = None,
    ) -> None:
        self.backend = backend
        self.bos_token, self.eos_token, self.pad_token = bos_token, eos_token, pad_token
        self.chat_template = chat_template
        self.bos_id = self._id_of(bos_token, "bos_token")
        self.eos_id = self._id_of(eos_token, "eos_token")
        self.pad_id = self._id_of(pad_token, "pad_token")

    def _id_of(self, token: str | None, name: str) -> int | None:
        if token is None:
            return None
        token_id = self.backend.token_to_id(token)
        if token_id is None:
            raise ValueError(f"{name} {token!r} is not in the tokenizer's vocabulary")
        return token_id

    @classmethod
    def from_dir(cls, directory: str | os.PathLike) -> Tokenizer:
        """Load ``tokenizer.json`` (required) and ``tokenizer_config.json`` (optional) from a
        model directory.

        Example:
            >>> tok = Tokenizer.from_dir("assets/tiny-llama")
        """
        directory = os.fspath(directory)
        path = os.path.join(directory, "tokenizer.json")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"no tokenizer.json in {directory!r} (looked for {path!r})")
        backend = tokenizers.Tokenizer.from_file(path)
        config: dict[str, Any] = {}
        config_path = os.path.join(directory, "tokenizer_config.json")
        if os.path.isfile(config_path):
            with open(config_path, encoding="utf-8") as f:
                try:
                    config = json.load(f)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{config_path}: invalid JSON: {e}") from e
        return cls(
            backend,
            bos_token=_token_string(config.get("bos_token")),
            eos_token=_token_string(config.get("eos_token")),
            pad_token=_token_string(config.get("pad_token")),
            chat_template=_load_chat_template(directory, config),
        )

    @property
    def vocab_size(self) -> int:
        """Number of token ids, added tokens included."""
        return self.backend.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_bos: bool = True, add_eos: bool = False) -> list[int]:
        """Token ids of ``text``; special-token strings in the text become their ids.

        BOS/EOS are added only when asked and only when the tokenizer defines them.

        Example:
            >>> tok.encode("hi", add_bos=False)
        """
        ids = self.backend.encode(text, add_special_tokens=False).ids
        if add_bos and self.bos_id is not None:
            ids = [self.bos_id, *ids]
        if add_eos and self.eos_id is not None:
            ids = [*ids, self.eos_id]
        return ids

    def encode_batch(self, texts: Sequence[str], add_bos: bool = True) -> list[list[int]]:
        """``encode`` for many texts at once (parallel in the ``tokenizers`` library).

        Example:
            >>> tok.encode_batch(["a", "b c"])
        """
        encodings = self.backend.encode_batch(list(texts), add_special_tokens=False)
        prefix = [self.bos_id] if add_bos and self.bos_id is not None else []
        return [prefix + e.ids for e in encodings]

    def decode(self, ids: Sequence[int], skip_special: bool = True) -> str:
        """Text of ``ids``, dropping special tokens unless ``skip_special=False``.

        Example:
            >>> tok.decode(tok.encode("hi"))
            'hi'
        """
        return self.backend.decode([int(i) for i in ids], skip_special_tokens=skip_special)

    def apply_chat_template(
        self, messages: Sequence[Message], add_generation_prompt: bool = False
    ) -> str:
        """Render a conversation with this tokenizer's chat template (see the module doc).

        Example:
            >>> tok.apply_chat_template([{"role": "user", "content": "hi"}], True)
            '<s>[INST] hi [/INST]'
        """
        if self.chat_template is None:
            raise ValueError(
                "this tokenizer has no chat_template (tokenizer_config.json 'chat_template' "
                "or chat_template.jinja); chat messages cannot be rendered"
            )
        return render_chat_template(
            self.chat_template,
            messages,
            bos_token=self.bos_token or "",
            eos_token=self.eos_token or "",
            add_generation_prompt=add_generation_prompt,
        )
