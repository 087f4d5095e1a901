"""Soft-prompt methods: prompt tuning, P-tuning (v1) and multitask prompt tuning.

Each adds ``params["prompt"]``: virtual-token embeddings prepended to the input
embeddings (their logits are dropped, so logits stay aligned with ``input_ids``).
Every base weight stays frozen.

Loading a P-tuning adapter gives a plain :class:`SoftPrompt` holding the saved
encoder output: peft saves only that output, the encoder cannot be recovered.
"""

from __future__ import annotations

import dataclasses
import warnings
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np

from jpeft.method import Method, Params, register
from jpeft.prompts import encoders, peft_io
from jpeft.prompts.nodes import MultitaskPrompt, PromptEncoder, SoftPrompt
from jpeft.prompts.prompt_init import INITS, initial_prompt, text_token_ids
from models.config import LlamaConfig

ENCODER_TYPES = ("MLP", "LSTM")


def install(params: Params, entry: str, node_: Any) -> Params:
    """``params`` plus ``params[entry] = node_``; refuses to replace an existing entry.

    Example:
        >>> sorted(install({"a": 1}, "prompt", 2))
        ['a', 'prompt']
    """
    if entry in params:
        raise ValueError(f"params already hold a {entry!r} entry ({type(params[entry]).__name__})")
    return {**params, entry: node_}


def prompt_node(params: Params, types: tuple[type, ...], owner: str) -> Any:
    """``params["prompt"]``, checked to be one of ``types``."""
    found = params.get("prompt")
    if not isinstance(found, types):
        names = [t.__name__ for t in types]
        raise ValueError(f"{owner}: params['prompt'] is {type(found).__name__}; expected {names}")
    return found


def _start(method: Any, key: jax.Array, params: Params) -> jax.Array:
    """The ``[n, hidden]`` initial prompt of a method with text-init options."""
    n = method.num_virtual_tokens
    ids = None
    if method.prompt_init == "TEXT":
        ids = text_token_ids(n, method.init_text, method.tokenizer, method.init_token_ids)
    return initial_prompt(key, params, n, method.prompt_init, ids)


def _check_init(owner: str, method: Any, valid: tuple[str, ...]) -> None:
    peft_io.check_virtual_tokens(owner, method.num_virtual_tokens)
    if method.prompt_init not in valid:
        raise ValueError(f"{owner}: prompt_init={method.prompt_init!r}; valid: {list(valid)}")
    if method.prompt_init == "TEXT" and method.init_text is None and method.init_token_ids is None:
        raise ValueError(f"{owner}: prompt_init='TEXT' needs init_text (and a tokenizer) or ids")


def _init_keys(method: Any) -> dict[str, Any]:
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


def _text_options(config: dict[str, Any]) -> dict[str, Any]:
    return {
        "prompt_init": config.get("prompt_tuning_init") or "RANDOM",
        "init_text": config.get("prompt_tuning_init_text"),
        "tokenizer_name_or_path": config.get("tokenizer_name_or_path"),
    }


@register
@dataclasses.dataclass(frozen=True)
class PromptTuning(Method):
    """Prompt tuning (Lester et al. 2021): ``num_virtual_tokens`` trainable embeddings.

    Args:
        prompt_init: ``"RANDOM"`` (standard normal, as peft), ``"SAMPLE_VOCAB"`` (rows
            of the embedding matrix at random token ids) or ``"TEXT"`` (the embeddings
            of ``init_text``'s tokens, cut or repeated to ``num_virtual_tokens``).
        init_text, tokenizer: for TEXT; ``tokenizer`` is any object with ``encode``.
        init_token_ids: for TEXT, ids to use instead of tokenizing ``init_text``.
        tokenizer_name_or_path: written to the peft config (peft needs it for TEXT).

    Example:
        >>> method = PromptTuning(num_virtual_tokens=8, prompt_init="TEXT",
        ...                       init_text="Classify the review:", tokenizer=tok)
        >>> params = method.init(jax.random.key(0), params, cfg)   # doctest: +SKIP
    """

    peft_type: ClassVar[str] = "PROMPT_TUNING"

    num_virtual_tokens: int = 20
    prompt_init: str = "RANDOM"
    init_text: str | None = None
    init_token_ids: tuple[int, ...] | None = None
    tokenizer: Any = dataclasses.field(default=None, compare=False, repr=False)
    tokenizer_name_or_path: str | None = None

    def __post_init__(self) -> None:
        _check_init("PromptTuning", self, INITS)

    def init(self, key: jax.Array, params: Params, cfg: LlamaConfig) -> Params:
        return install(params, "prompt", SoftPrompt(_start(self, key, params)))

    def peft_config(self, cfg: LlamaConfig) -> dict[str, Any]:
        keys = peft_io.model_keys(cfg, self.num_virtual_tokens, prefix=False)
        return {"peft_type": self.peft_type, **keys, **_init_keys(self)}

    def peft_tensors(self, params: Params, cfg: LlamaConfig) -> dict[str, np.ndarray]:
        node_ = prompt_node(params, (SoftPrompt,), "PromptTuning")
        return {peft_io.TABLE: np.asarray(node_.table(), np.float32)}

    @classmethod
    def from_peft(
        cls,
        config: dict[str, Any],
        tensors: dict[str, np.ndarray],
        params: Params,
        cfg: LlamaConfig,
    ) -> tuple[PromptTuning, Params]:
        n = peft_io.check_model(config, cfg, prefix=False)
        table = peft_io.read(tensors, peft_io.TABLE, (n, cfg.hidden_size))
        method = cls(num_virtual_tokens=n, **_text_options(config))
        return method, install(params, "prompt", SoftPrompt(jnp.asarray(table)))


@register
@dataclasses.dataclass(frozen=True)
class PTuning(Method):
    """P-tuning v1 (Liu et al. 2021): virtual tokens reparameterized by a prompt encoder.

    Trainable: the ``[n, hidden]`` embedding and the encoder (``"MLP"`` or a
    bidirectional ``"LSTM"``, peft's shapes; ``encoder_num_layers`` counts LSTM
    layers and, as in peft, is ignored by the MLP). The adapter file holds only the
    encoder output; loading one gives a plain soft prompt.

    Example:
        >>> method = PTuning(num_virtual_tokens=8, encoder_type="LSTM", encoder_hidden_size=64)
        >>> params = method.init(jax.random.key(0), params, cfg)   # doctest: +SKIP
    """

    peft_type: ClassVar[str] = "P_TUNING"

    num_virtual_tokens: int = 20
    encoder_type: str = "MLP"
    encoder_hidden_size: int | None = None
    encoder_num_layers: int = 2
    encoder_dropout: float = 0.0

    def __post_init__(self) -> None:
        peft_io.check_virtual_tokens("PTuning", self.num_virtual_tokens)
        if self.encoder_type not in ENCODER_TYPES:
            raise ValueError(f"PTuning: encoder_type={self.encoder_type!r}; valid: {ENCODER_TYPES}")
        if self.encoder_hidden_size is not None and self.encoder_hidden_size <= 0:
            raise ValueError(f"PTuning: encoder_hidden_size={self.encoder_hidden_size} must be > 0")
        if not 0.0 <= self.encoder_dropout < 1.0:
            raise ValueError(f"PTuning: encoder_dropout={self.encoder_dropout} not in [0, 1)")
        if self.encoder_type == "MLP" and self.encoder_num_layers != 2:
            warnings.warn(
                "PTuning: the MLP encoder always has 2 hidden layers; "
                f"encoder_num_layers={self.encoder_num_layers} is ignored",
                stacklevel=3,
            )

    def hidden_size(self, cfg: LlamaConfig) -> int:
        """The encoder width (peft's default: the model's hidden size)."""
        return self.encoder_hidden_size or cfg.hidden_size

    def init(self, key: jax.Array, params: Params, cfg: LlamaConfig) -> Params:
        k_embed, k_enc = jax.random.split(key)
        dim, hidden = cfg.hidden_size, self.hidden_size(cfg)
        embedding = jax.random.normal(k_embed, (self.num_virtual_tokens, dim), jnp.float32)
        if self.encoder_type == "LSTM":
            encoder = encoders.init_lstm(k_enc, dim, hidden, self.encoder_num_layers)
        else:
            encoder = encoders.init_mlp(k_enc, dim, hidden)
        node_ = PromptEncoder(embedding, encoder, self.encoder_type, self.encoder_dropout)
        return install(params, "prompt", node_)

    def peft_config(self, cfg: LlamaConfig) -> dict[str, Any]:
        return {
            "peft_type": self.peft_type,
            **peft_io.model_keys(cfg, self.num_virtual_tokens, prefix=False),
            "encoder_reparameterization_type": self.encoder_type,
            "encoder_hidden_size": self.hidden_size(cfg),
            "encoder_num_layers": self.encoder_num_layers,
            "encoder_dropout": self.encoder_dropout,
        }

    def peft_tensors(self, params: Params, cfg: LlamaConfig) -> dict[str, np.ndarray]:
        node_ = prompt_node(params, (PromptEncoder, SoftPrompt), "PTuning")
        return {peft_io.TABLE: np.asarray(node_.table(), np.float32)}

    @classmethod
    def from_peft(
        cls,
        config: dict[str, Any],
        tensors: dict[str, np.ndarray],
        params: Params,
        cfg: LlamaConfig,
    ) -> tuple[PTuning, Params]:
        n = peft_io.check_model(config, cfg, prefix=False)
        table = peft_io.read(tensors, peft_io.TABLE, (n, cfg.hidden_size))
        method = cls(
            num_virtual_tokens=n,
            encoder_type=config.get("encoder_reparameterization_type") or "MLP",
            encoder_hidden_size=config.get("encoder_hidden_size"),
            encoder_num_layers=config.get("encoder_num_layers", 2),
            encoder_dropout=config.get("encoder_dropout", 0.0),
        )
        return method, install(params, "prompt", SoftPrompt(jnp.asarray(table)))


@register
@dataclasses.dataclass(frozen=True)
class MultitaskPromptTuning(Method):
    """peft's multitask prompt tuning (Wang et al. 2023): one prompt per task.

    The prompt of task ``t`` is ``shared * (cols[t] @ rows[t])`` with a shared
    ``[n, hidden]`` embedding (RANDOM or TEXT init) and rank-``num_ranks`` task
    factors (normal, std 0.02). Each row picks its task through ``task_ids [B]``
    (``model.apply(..., task_ids=...)``; a batch may mix tasks).

    Example:
        >>> method = MultitaskPromptTuning(num_virtual_tokens=8, num_tasks=3)
        >>> params = method.init(jax.random.key(0), params, cfg)           # doctest: +SKIP
        >>> logits = model.apply({"params": params}, ids, task_ids=tasks)  # doctest: +SKIP
    """

    peft_type: ClassVar[str] = "MULTITASK_PROMPT_TUNING"

    num_virtual_tokens: int = 20
    num_tasks: int = 1
    num_ranks: int = 1
    prompt_init: str = "RANDOM"
    init_text: str | None = None
    init_token_ids: tuple[int, ...] | None = None
    tokenizer: Any = dataclasses.field(default=None, compare=False, repr=False)
    tokenizer_name_or_path: str | None = None

    def __post_init__(self) -> None:
        _check_init("MultitaskPromptTuning", self, ("RANDOM", "TEXT"))
        for name in ("num_tasks", "num_ranks"):
            if getattr(self, name) <= 0:
                raise ValueError(f"MultitaskPromptTuning: {name}={getattr(self, name)} must be > 0")

    def init(self, key: jax.Array, params: Params, cfg: LlamaConfig) -> Params:
        k_embed, k_cols, k_rows = jax.random.split(key, 3)
        n, t, r = self.num_virtual_tokens, self.num_tasks, self.num_ranks
        node_ = MultitaskPrompt(
            embedding=_start(self, k_embed, params),
            task_cols=0.02 * jax.random.normal(k_cols, (t, n, r), jnp.float32),
            task_rows=0.02 * jax.random.normal(k_rows, (t, r, cfg.hidden_size), jnp.float32),
        )
        return install(params, "prompt", node_)

    def peft_config(self, cfg: LlamaConfig) -> dict[str, Any]:
        return {
            "peft_type": self.peft_type,
            **peft_io.model_keys(cfg, self.num_virtual_tokens, prefix=False),
            **_init_keys(self),
            "prompt_tuning_init_state_dict_path": None,
            "prompt_tuning_init_task": 0,
            "num_tasks": self.num_tasks,
            "num_ranks": self.num_ranks,
        }

    def peft_tensors(self, params: Params, cfg: LlamaConfig) -> dict[str, np.ndarray]:
        node_ = prompt_node(params, (MultitaskPrompt,), "MultitaskPromptTuning")
        return {
            peft_io.TABLE: np.asarray(node_.embedding, np.float32),
            "prefix_task_cols": np.asarray(node_.task_cols, np.float32),
            "prefix_task_rows": np.asarray(node_.task_rows, np.float32),
        }

    @classmethod
    def from_peft(
        cls,
        config: dict[str, Any],
        tensors: dict[str, np.ndarray],
        params: Params,
        cfg: LlamaConfig,
    ) -> tuple[MultitaskPromptTuning, Params]:
        n = peft_io.check_model(config, cfg, prefix=False)
        t, r = int(config.get("num_tasks") or 1), int(config.get("num_ranks") or 1)
        options = _text_options(config)
        if options["prompt_init"] not in ("RANDOM", "TEXT"):
            options["prompt_init"] = "RANDOM"  # a source-task init; the weights are in the file
        method = cls(num_virtual_tokens=n, num_tasks=t, num_ranks=r, **options)
        node_ = MultitaskPrompt(
            embedding=jnp.asarray(peft_io.read(tensors, peft_io.TABLE, (n, cfg.hidden_size))),
            task_cols=jnp.asarray(peft_io.read(tensors, "prefix_task_cols", (t, n, r))),
            task_rows=jnp.asarray(
                peft_io.read(tensors, "prefix_task_rows", (t, r, cfg.hidden_size))
            ),
        )
        return method, install(params, "prompt", node_)
