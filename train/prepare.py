"""Load and check everything a run needs (model, tokenizer, data) before anything compiles.

Every problem a user can cause (a missing model directory, a malformed JSONL line, an
example longer than the context, a sequence length beyond the model's) raises a
ValueError or FileNotFoundError here, before the first ``jax.jit``.
"""

from __future__ import annotations

import dataclasses
import os

import jax.numpy as jnp
import numpy as np

from jpeft.models import hf
from jpeft.models.config import LlamaConfig
from jpeft.models.pytree import Params
from jpeft.models.tokenizer import Tokenizer
from jpeft.train import data, methods
from jpeft.train.config import RunConfig, resolve_path


@dataclasses.dataclass(frozen=True)
class Dataset:
    """Tokenized training examples, and the held-out examples and records (for accuracy)."""

    train: list[data.Example]
    eval: list[data.Example]
    eval_records: list[data.Record]


def model_dir(path: str) -> str:
    """The model directory ``path`` (bundled ``assets/...`` found from anywhere), checked.

    Example:
        >>> model_dir("no/such/dir")
        Traceback (most recent call last):
        FileNotFoundError: model directory not found: 'no/such/dir'
    """
    resolved = resolve_path(path)
    if not os.path.isdir(resolved):
        raise FileNotFoundError(f"model directory not found: {path!r}")
    return resolved


def load_config_and_tokenizer(
    path: str, tokenizer_dir: str | None = None
) -> tuple[str, LlamaConfig, Tokenizer]:
    """``(resolved dir, config, tokenizer)`` of a model directory, without loading weights.

    The tokenizer comes from ``tokenizer_dir`` (``--tokenizer``) when given, else from the
    model directory.

    Example:
        >>> _, cfg, tok = load_config_and_tokenizer("assets/tiny-llama")
        >>> cfg.vocab_size >= tok.vocab_size
        True
    """
    path = model_dir(path)
    cfg = LlamaConfig.from_json(path)
    where = resolve_path(tokenizer_dir) if tokenizer_dir is not None else path
    if not os.path.isdir(where):
        raise FileNotFoundError(f"tokenizer directory not found: {tokenizer_dir!r}")
    try:
        tokenizer = Tokenizer.from_dir(where)
    except FileNotFoundError as e:
        fix = "another" if tokenizer_dir is not None else "the"
        raise FileNotFoundError(
            f"{e} Give {fix} directory holding the tokenizer.json with --tokenizer DIR "
            "(or 'tokenizer' in the config file)."
        ) from e
    if tokenizer.vocab_size > cfg.vocab_size:
        raise ValueError(
            f"{where}: the tokenizer has {tokenizer.vocab_size} tokens, more than the model's "
            f"vocab_size {cfg.vocab_size} ({path})"
        )
    return path, cfg, tokenizer


def load_weights(path: str, run: RunConfig) -> Params:
    """The base params in ``run.dtype``, quantized while loading if ``run.quantize`` says so.

    With ``--method qlora`` the kernels are quantized with the method's own settings
    (``--qlora-quant-type``, ``--qlora-blocksize``, ``--qlora-double-quant``), so
    ``--quantize`` then only saves host memory while loading.

    Example:
        >>> params = load_weights("assets/tiny-llama", RunConfig(quantize="nf4"))
        >>> type(params["layers"]["mlp"]["up_proj"]["kernel"]).__name__
        'QuantizedWeight'
    """
    quantize: str | hf.Quantizer | None = run.quantize
    if quantize is not None and run.method == "qlora":
        quantize = _qlora_quantizer(run)
    _, params = hf.load_pretrained(path, dtype=jnp.dtype(run.dtype), quantize=quantize)
    return params


def _qlora_quantizer(run: RunConfig) -> hf.Quantizer:
    qlora = methods.build(run.method, run.options(), None)
    if qlora.quant_type != run.quantize:
        raise ValueError(
            f"--quantize {run.quantize} conflicts with --qlora-quant-type {qlora.quant_type}; "
            "drop --quantize (qlora quantizes anyway) or make them agree"
        )
    return qlora.quantize


def packing(run: RunConfig) -> bool:
    """Whether training rows are packed: the run's choice, else the method's default.

    Example:
        >>> packing(RunConfig(method="prompt")), packing(RunConfig())
        (False, True)
    """
    if run.packing and not run.spec.packing:
        raise ValueError(
            f"--packing cannot be used with --method {run.method}: its soft prompt is "
            "prepended once per row, so rows cannot hold several examples"
        )
    return run.spec.packing if run.packing is None else run.packing


def load_data(run: RunConfig, tokenizer: Tokenizer, cfg: LlamaConfig) -> Dataset:
    """Read, split, tokenize and length-check the training and held-out data.

    Instruction records (any format of ``data.HELP``) are split by record and scored for
    accuracy; text (a ``text`` format file or a plain-text corpus) is cut into pieces, and its
    held-out part has a loss but no accuracy.

    Example:
        >>> cfg = LlamaConfig.from_json("assets/tiny-llama")
        >>> ds = load_data(RunConfig(), Tokenizer.from_dir("assets/tiny-llama"), cfg)
        >>> len(ds.train), len(ds.eval_records)
        (2000, 200)
    """
    check_seq_len(run, cfg)
    records = data.read_data(_data_file(run.train_data, "train_data"), run.data_format)
    held_out: list[data.Example] = []
    eval_records: list[data.Record] = []
    if run.eval_data is not None:
        held_out, eval_records = load_held_out(run.eval_data, tokenizer, run)
    if records[0].kind == "text":
        train = _encode(tokenizer, records, run)
        if run.eval_data is None:
            order = np.random.default_rng(run.seed).permutation(len(train))
            cut = max(1, round(run.eval_fraction * len(train)))
            held_out, train = [train[i] for i in order[:cut]], [train[i] for i in order[cut:]]
    else:
        if run.eval_data is None:
            records, eval_records = data.split_eval(records, run.eval_fraction, run.seed)
            held_out = _encode(tokenizer, eval_records, run)
        train = _encode(tokenizer, records, run)
    if not train:
        raise ValueError(f"{run.train_data}: no training examples left after the eval split")
    return Dataset(train, held_out, eval_records)


def check_seq_len(run: RunConfig, cfg: LlamaConfig) -> None:
    """``run.seq_len`` must fit the model's context.

    Example:
        >>> cfg = LlamaConfig(vocab_size=8, hidden_size=8, intermediate_size=8, num_hidden_layers=1,
        ...                   num_attention_heads=1, max_position_embeddings=32)
        >>> check_seq_len(RunConfig(seq_len=64), cfg)
        Traceback (most recent call last):
        ValueError: seq_len 64 is longer than the model's context (max_position_embeddings = 32)
    """
    if run.seq_len > cfg.max_position_embeddings:
        raise ValueError(
            f"seq_len {run.seq_len} is longer than the model's context "
            f"(max_position_embeddings = {cfg.max_position_embeddings})"
        )


def load_held_out(
    path: str, tokenizer: Tokenizer, run: RunConfig
) -> tuple[list[data.Example], list[data.Record]]:
    """``(examples, records)`` of an eval file; text has no records (no accuracy).

    Example:
        >>> tok = Tokenizer.from_dir("assets/tiny-llama")
        >>> examples, records = load_held_out("assets/data/eval.jsonl", tok, RunConfig())
        >>> len(examples) == len(records)
        True
    """
    records = data.read_data(_data_file(path, "eval_data"), run.data_format)
    examples = _encode(tokenizer, records, run)
    return examples, [] if records[0].kind == "text" else records


def _encode(tokenizer: Tokenizer, records: list[data.Record], run: RunConfig) -> list:
    return data.encode_records(tokenizer, records, run.seq_len, run.truncate)


def _data_file(path: str, option: str) -> str:
    resolved = resolve_path(path)
    if not os.path.isfile(resolved):
        raise FileNotFoundError(f"{option}: file not found: {path!r}")
    return resolved
