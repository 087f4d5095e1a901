"""How a soft prompt starts: peft's RANDOM, SAMPLE_VOCAB and TEXT initializations."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp

from models.linear import dense

INITS = ("RANDOM", "SAMPLE_VOCAB", "TEXT")


def text_token_ids(
    n: int,
    text: str | None = None,
    tokenizer: Any = None,
    token_ids: Sequence[int] | None = None,
) -> list[int]:
    """The ``n`` token ids a TEXT init embeds: the text's ids cut or repeated to ``n``.

    ``tokenizer`` is anything with ``encode(text)`` returning ids (jpeft's
    ``models.tokenizer.Tokenizer``, a transformers tokenizer, a ``tokenizers.Tokenizer``);
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
    params: dict[str, Any],
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
