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
from jpeft import quant
from jpeft.hf_adapter import adapter_base_quantization
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
    run: RunConfig,
    adapter: str | None = None,
    run_dir: str | None = None,
    step: int | None = None,
    *,
    fall_back: bool = False,
) -> Model:
    """The base of ``run.model`` plus an adapter directory or a run's checkpoint.

    ``fall_back``: a corrupt newest checkpoint is set aside and the newest good one used.

    Example:
        >>> model = load_model(RunConfig())  # the bundled model, no adapter
        >>> model.cfg.num_hidden_layers, sorted(model.params)[:2]
        (4, ['embed_tokens', 'layers'])
    """
    if adapter and run_dir:
        raise ValueError("give --adapter or --run, not both")
    if adapter and not os.path.isdir(adapter):
        raise FileNotFoundError(f"adapter directory not found: {adapter!r}")
    path, cfg, tokenizer = load_config_and_tokenizer(run.model, run.tokenizer)
    method = build.method(run, tokenizer) if run_dir else None
    if adapter:
        quantize = adapter_quantizer(run, adapter)
        _, base = hf.load_pretrained(path, dtype=jnp.dtype(run.dtype), quantize=quantize)
    else:
        base = load_weights(path, run)
    if adapter:
        method, params = jpeft.load_hf_adapter(adapter, base, cfg)
    elif run_dir:
        params = build.init_params(run, method, base, cfg)
        _, state, frozen = build.train_state(run, params, cfg, make_mesh(run.mesh))
        with Checkpointer(os.path.join(run_dir, "checkpoints")) as ckpt:
            state, _ = ckpt.restore(state, step, fall_back=fall_back)
        say(f"loaded {run.method} from {run_dir}, step {int(state.step)}")
        params = jpeft.combine(state.trainable, frozen)
    else:
        params = base
    mesh = make_mesh(run.mesh)
    params = jax.device_put(params, tree_shardings(params, mesh))
    return Model(path, cfg, tokenizer, method, params)


def adapter_quantizer(run: RunConfig, adapter: str) -> str | hf.Quantizer | None:
    """How to load the base of ``adapter``: quantized as it was in training, never silently
    otherwise. An adapter saved by jpeft records its base's quantization
    (``jpeft_base.json``); ``--quantize`` must agree with it, and without ``--quantize``
    the recorded settings are used. An adapter from elsewhere records nothing.

    Example:
        >>> adapter_quantizer(RunConfig(quantize="nf4"), "no/record") # nothing recorded
        'nf4'
    """
    recorded, quantization = adapter_base_quantization(adapter)
    if not recorded:
        return run.quantize
    if quantization is None:
        if run.quantize is not None:
            raise ValueError(
                f"{adapter} was trained on an unquantized base; drop --quantize "
                f"{run.quantize} (it would evaluate the adapter on another base)"
            )
        return None
    kind = quantization["quant_type"]
    if run.quantize not in (None, kind):
        raise ValueError(
            f"{adapter} was trained on a {kind} base (recorded in {adapter}/jpeft_base.json); "
            f"--quantize {run.quantize} would give another base: drop it or use {kind}"
        )
    say(f"{adapter} was trained on a {kind} base: quantizing the base as recorded")
    blocksize, double = quantization["blocksize"], quantization["double_quant"]
    return lambda kernel, module: quant.quantize(kernel, kind, blocksize, double)


def evaluate(run: RunConfig, model: Model) -> EvalResult:
    """Held-out loss, perplexity and accuracy of ``model`` on ``run.eval_data``.

    Example:
        >>> run = RunConfig(eval_data="assets/data/eval.jsonl", eval_samples=4)
        >>> evaluate(run, load_model(run)).total  # also prints the data and a summary line
        held-out data: assets/data/eval.jsonl
        eval loss ... accuracy ...% (.../4)
        4
    """
    if run.eval_data is None:
        raise ValueError("jpeft eval needs --eval-data")
    check_seq_len(run, model.cfg)
    examples, records = load_held_out(run.eval_data, model.tokenizer, run)
    say(f"held-out data: {run.eval_data}")
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
    compute_dtype: str = "auto",
) -> list[str]:
    """Continue each prompt; without ``raw`` prompts are rendered as in training.

    Example:
        >>> [answer] = generate(load_model(RunConfig()), ["Sort: 3 1 2"], max_new_tokens=4)
        >>> isinstance(answer, str)  # the untrained bundled model answers noise
        True
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
        dtype=compute_dtype,
    )
    tokens, lengths = to_host((result.tokens, result.lengths))
    return [tok.decode(tokens[i, : lengths[i]]).strip() for i in range(len(encoded))]


def check_out_dir(out: str, reads: Sequence[str | None], overwrite: bool = False) -> None:
    """Refuse an export into a file, into a directory it reads from, or (unless
    ``overwrite``) into a non-empty directory; before anything is loaded.

    Example:
        >>> check_out_dir("assets", reads=["assets"])  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ValueError: --out 'assets' is the directory the export reads from ...
    """
    if os.path.lexists(out) and not os.path.isdir(out):
        raise ValueError(f"--out {out!r} is an existing file; give a directory to write into")
    for source in filter(None, reads):
        if os.path.realpath(source) == os.path.realpath(out):
            raise ValueError(
                f"--out {out!r} is the directory the export reads from ({source}); "
                "write it to another directory"
            )
    if os.path.isdir(out) and os.listdir(out) and not overwrite:
        raise ValueError(
            f"--out {out!r} is not empty; choose another directory, or give --overwrite to "
            "write into it"
        )


def export(model: Model, out: str, merged: bool = False, dtype: str | None = None) -> str:
    """Write a peft adapter directory, or (``merged``) an HF model directory with the
    method folded into the base weights. Returns what was written.

    Example:
        >>> run = RunConfig(method="lora")
        >>> model = load_model(run)
        >>> model = dataclasses.replace(model, params=build.init_params(
        ...     run, build.method(run), model.params, model.cfg))
        >>> import tempfile
        >>> out = os.path.join(tempfile.mkdtemp(), "merged")
        >>> export(model, out, merged=True)
        'merged HF model'
        >>> sorted(os.listdir(out))  # weights, config and the tokenizer files
        ['config.json', 'model.safetensors', 'special_tokens_map.json', 'tokenizer.json',
         'tokenizer_config.json']
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
