"""How a soft prompt starts: peft's RANDOM, SAMPLE_VOCAB and TEXT initializations."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp

from jpeft.adapter_files import AdapterConfig
from jpeft.models.linear import dense
from jpeft.models.pytree import Params
from jpeft.prompts.peft_io import check_virtual_tokens

INITS = ("RANDOM", "SAMPLE_VOCAB", "TEXT")


@dataclasses.dataclass(frozen=True)
class PromptInit:
    """The options of a soft prompt that starts as peft's do (a base of method dataclasses).

    Args:
        num_virtual_tokens: prompt length.
        prompt_init: ``"RANDOM"`` (standard normal, as peft), ``"SAMPLE_VOCAB"`` (rows
            of the embedding matrix at random token ids) or ``"TEXT"`` (the embeddings
            of ``init_text``'s tokens, cut or repeated to ``num_virtual_tokens``).
        init_text, tokenizer: for TEXT; ``tokenizer`` is any object with ``encode``.
        init_token_ids: for TEXT, ids to use instead of tokenizing ``init_text``.
        tokenizer_name_or_path: written to the peft config (peft needs it for TEXT).

    Example:
        >>> PromptInit(num_virtual_tokens=4).prompt_init
        'RANDOM'
    """

    num_virtual_tokens: int = 20
    prompt_init: str = "RANDOM"
    init_text: str | None = None
    init_token_ids: tuple[int, ...] | None = None
    tokenizer: Any = dataclasses.field(default=None, compare=False, repr=False)
    tokenizer_name_or_path: str | None = None


def text_token_ids(
    n: int,
    text: str | None = None,
    tokenizer: Any = None,
    token_ids: Sequence[int] | None = None,
) -> list[int]:
    """The ``n`` token ids a TEXT init embeds: the text's ids cut or repeated to ``n``.

    ``tokenizer`` is anything with ``encode(text)`` returning ids (jpeft's
    ``jpeft.models.tokenizer.Tokenizer``, a transformers tokenizer, a ``tokenizers.Tokenizer``);
    as with peft's ``tokenizer(text)["input_ids"]`` the tokenizer's default special
    tokens (LLaMA: BOS) are included. ``token_ids`` skips tokenizing.

    Example:
        >>> text_token_ids(5, token_ids=[7, 8])
        [7, 8, 7, 8, 7]
    """
    if token_ids is None:
        if text is None or tokenizer is None:
            raise ValueError(
                "TEXT init needs init_token_ids, or init_text and a tokenizer "
                f"(got init_text={text!r}, tokenizer={tokenizer!r})"
            )
        if not callable(getattr(tokenizer, "encode", None)):
            raise ValueError(f"tokenizer {type(tokenizer).__name__} has no encode method")
        encoded = tokenizer.encode(text)
        token_ids = getattr(encoded, "ids", encoded)
    ids = [int(i) for i in token_ids]
    if not ids:
        raise ValueError(f"TEXT init: the text {text!r} has no tokens")
    return (ids * math.ceil(n / len(ids)))[:n]


def initial_prompt(
    key: jax.Array,
    params: Params,
    n: int,
    init: str,
    text_ids: Sequence[int] | None = None,
) -> jax.Array:
    """A ``[n, hidden]`` float32 prompt initialized like peft's ``PromptEmbedding``.

    RANDOM: standard normal (torch ``nn.Embedding``'s default; note its scale is far
    above a LLaMA embedding's). SAMPLE_VOCAB: the base embedding rows of ``n``
    uniformly sampled token ids. TEXT: the base embedding rows of ``text_ids``.

    Example:
        >>> params = {"embed_tokens": {"embedding": jnp.eye(4)}}
        >>> initial_prompt(jax.random.key(0), params, 2, "TEXT", [3, 1]).tolist()
        [[0.0, 0.0, 0.0, 1.0], [0.0, 1.0, 0.0, 0.0]]
    """
    table = dense(params["embed_tokens"]["embedding"])
    vocab, hidden = table.shape
    if init == "RANDOM":
        return jax.random.normal(key, (n, hidden), jnp.float32)
    if init == "SAMPLE_VOCAB":
        ids = jax.random.randint(key, (n,), 0, vocab)
    elif init == "TEXT":
        if text_ids is None or len(text_ids) != n:
            raise ValueError(f"TEXT init: expected {n} token ids, got {text_ids!r}")
        ids = jnp.asarray(text_ids, jnp.int32)
        if int(ids.min()) < 0 or int(ids.max()) >= vocab:
            raise ValueError(f"TEXT init: token ids {list(text_ids)} outside the vocab of {vocab}")
    else:
        raise ValueError(f"prompt init {init!r}; expected one of {INITS}")
    return table[ids].astype(jnp.float32)


def start_prompt(method: Any, key: jax.Array, params: Params) -> jax.Array:
    """The ``[n, hidden]`` initial prompt of a method with prompt-init options.

    ``method`` has ``num_virtual_tokens``, ``prompt_init``, ``init_text``,
    ``tokenizer`` and ``init_token_ids`` (PromptTuning, MultitaskPromptTuning).

    Example:
        >>> import jpeft
        >>> from jpeft.models import hf
        >>> _, params = hf.load_pretrained("assets/tiny-llama")
        >>> start_prompt(jpeft.PromptTuning(num_virtual_tokens=4), jax.random.key(0), params).shape
        (4, 128)
    """
    n = method.num_virtual_tokens
    ids = None
    if method.prompt_init == "TEXT":
        ids = text_token_ids(n, method.init_text, method.tokenizer, method.init_token_ids)
    return initial_prompt(key, params, n, method.prompt_init, ids)


def check_init(owner: str, method: Any, valid: tuple[str, ...]) -> None:
    """Raise ``ValueError`` for a bad token count or prompt init of ``method``."""
    check_virtual_tokens(owner, method.num_virtual_tokens)
    if method.prompt_init not in valid:
        raise ValueError(f"{owner}: prompt_init={method.prompt_init!r}; valid: {list(valid)}")
    if method.prompt_init == "TEXT" and method.init_text is None and method.init_token_ids is None:
        raise ValueError(f"{owner}: prompt_init='TEXT' needs init_text (and a tokenizer) or ids")


def peft_init_keys(method: Any) -> dict[str, Any]:
    """peft's init keys; TEXT is written only when peft can re-read it (text and tokenizer path).

    peft's config refuses ``prompt_tuning_init='TEXT'`` without both, even when it
    only loads trained weights, so otherwise the file says RANDOM (the init no
    longer matters once the prompt is trained).
    """
    init = method.prompt_init
    if init == "TEXT" and (method.init_text is None or method.tokenizer_name_or_path is None):
        init = "RANDOM"
    return {
        "prompt_tuning_init": init,
        "prompt_tuning_init_text": method.init_text,
        "tokenizer_name_or_path": method.tokenizer_name_or_path,
        "tokenizer_kwargs": None,
    }


def init_options(config: AdapterConfig) -> dict[str, Any]:
    """The prompt-init options of a method, read from a peft ``adapter_config.json``."""
    return {
        "prompt_init": config.get("prompt_tuning_init", str) or "RANDOM",
        "init_text": config.get("prompt_tuning_init_text", str),
        "tokenizer_name_or_path": config.get("tokenizer_name_or_path", str),
    }
