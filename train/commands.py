"""``jpeft eval``, ``jpeft generate`` and ``jpeft export`` on a base model plus an adapter.

The trained part comes from a peft adapter directory (``--adapter``) or from a run
directory's orbax checkpoint (``--run``, newest or ``--step``); neither means the base.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence

import jax
import jax.numpy as jnp

import jpeft
import jpeft.adapters  # registers the adapter methods for load_hf_adapter
from jpeft.models import generate as gen
from jpeft.models import hf
from jpeft.models.config import LlamaConfig
from jpeft.models.pytree import Params
from jpeft.models.tokenizer import Tokenizer
from jpeft.train import build, data
from jpeft.train.checkpoint import Checkpointer
from jpeft.train.config import RunConfig
from jpeft.train.distributed import is_main, to_host
from jpeft.train.evaluate import EvalResult, Evaluator
from jpeft.train.metrics_log import say
from jpeft.train.prepare import (
    check_seq_len,
    load_config_and_tokenizer,
    load_held_out,
    load_weights,
    packing,
)
from jpeft.train.sharding import make_mesh, tree_shardings


@dataclasses.dataclass(frozen=True)
class Model:
    """A base model with (optionally) a trained method applied."""

    path: str
    cfg: LlamaConfig
    tokenizer: Tokenizer
    method: jpeft.Method | None
    params: Params


def load_model(
    run: RunConfig, adapter: str | None = None, run_dir: str | None = None, step: int | None = None
) -> Model:
    """The base of ``run.model`` plus an adapter directory or a run's checkpoint.

    Example:
        >>> model = load_model(RunConfig(), adapter="runs/lora-x/adapter")  # doctest: +SKIP
    """
    if adapter and run_dir:
        raise ValueError("give --adapter or --run, not both")
    if adapter and not os.path.isdir(adapter):
        raise FileNotFoundError(f"adapter directory not found: {adapter!r}")
    path, cfg, tokenizer = load_config_and_tokenizer(run.model, run.tokenizer)
    method = build.method(run, tokenizer) if run_dir else None
    base = load_weights(path, run)
    if adapter:
        method, params = jpeft.load_hf_adapter(adapter, base, cfg)
    elif run_dir:
        params = build.init_params(run, method, base, cfg)
        _, state, frozen = build.train_state(run, params, cfg, make_mesh(run.mesh))
        with Checkpointer(os.path.join(run_dir, "checkpoints")) as ckpt:
            state, _ = ckpt.restore(state, step)
        say(f"loaded {run.method} from {run_dir}, step {int(state.step)}")
        params = jpeft.combine(state.trainable, frozen)
    else:
        params = base
    mesh = make_mesh(run.mesh)
    params = jax.device_put(params, tree_shardings(params, mesh, params))
    return Model(path, cfg, tokenizer, method, params)


def evaluate(run: RunConfig, model: Model) -> EvalResult:
    """Held-out loss, perplexity and accuracy of ``model`` on ``run.eval_data``.

    Example:
        >>> print(evaluate(RunConfig(), load_model(RunConfig())).summary())  # doctest: +SKIP
    """
    if run.eval_data is None:
        raise ValueError("jpeft eval needs --eval-data")
    check_seq_len(run, model.cfg)
    examples, records = load_held_out(run.eval_data, model.tokenizer, run)
    evaluator = Evaluator(
        model.cfg,
        model.tokenizer,
        examples,
        records,
        mesh=make_mesh(run.mesh),
        batch_size=run.eval_batch_size,
        seq_len=run.seq_len,
        packing=packing(run) and "prompt" not in model.params,
        max_samples=run.eval_samples,
        max_new_tokens=run.max_new_tokens,
        compute_dtype=run.compute_dtype,
    )
    result = evaluator(model.params)
    say(result.summary())
    return result


def generate(
    model: Model,
    prompts: Sequence[str],
    *,
    raw: bool = False,
    max_new_tokens: int = 64,
    temperature: float = 0.0,
    top_p: float = 1.0,
    top_k: int = 0,
    seed: int = 0,
    compute_dtype: str = "float32",
) -> list[str]:
    """Continue each prompt; without ``raw`` prompts are rendered as in training.

    Example:
        >>> generate(load_model(RunConfig()), ["Sort: 3 1 2"])  # doctest: +SKIP
        ['1 2 3']
    """
    if not prompts:
        raise ValueError("give at least one --prompt")
    tok = model.tokenizer
    if raw:
        encoded = [tok.encode(p) for p in prompts]
    else:
        encoded = [
            data.generation_prompt(tok, data.Record(prompt=p, response="x")) for p in prompts
        ]
    width = max(len(p) for p in encoded)
    if width + max_new_tokens > model.cfg.max_position_embeddings:
        raise ValueError(
            f"prompt of {width} tokens plus {max_new_tokens} new tokens is longer than the "
            f"model's context ({model.cfg.max_position_embeddings})"
        )
    pad = tok.pad_id if tok.pad_id is not None else 0
    ids, mask = gen.left_pad(encoded, pad)
    result = gen.generate(
        model.params,
        model.cfg,
        ids,
        mask,
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_p=top_p,
        top_k=top_k,
        stop_tokens=(tok.eos_id,) if tok.eos_id is not None else None,
        pad_token_id=pad,
        rng=jax.random.key(seed),
        dtype=jnp.dtype(compute_dtype),
    )
    tokens, lengths = to_host((result.tokens, result.lengths))
    return [tok.decode(tokens[i, : lengths[i]]).strip() for i in range(len(encoded))]


def export(model: Model, out: str, merged: bool = False, dtype: str | None = None) -> str:
    """Write a peft adapter directory, or (``merged``) an HF model directory with the
    method folded into the base weights. Returns what was written.

    Example:
        >>> model = load_model(run, run_dir="runs/lora-x")  # doctest: +SKIP
        >>> export(model, "out/merged", merged=True)  # doctest: +SKIP
        'merged HF model'
    """
    if merged:
        params = jpeft.merge(model.params)
        if jax.process_count() > 1:
            params = to_host(params)
        if is_main():
            tokenizer_dir = model.tokenizer.source or model.path
            hf.save_pretrained(out, model.cfg, params, dtype=dtype, tokenizer_dir=tokenizer_dir)
        return "merged HF model"
    if model.method is None:
        raise ValueError("nothing to export as an adapter: give --adapter or --run")
    trainable, frozen = jpeft.split(model.params)
    params = jpeft.combine(to_host(trainable), frozen)
    if is_main():
        jpeft.save_hf_adapter(out, model.method, params, model.cfg, model.path)
    return "peft adapter"
