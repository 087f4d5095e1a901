"""Train-step tokens/s and peak memory of every jpeft method against HF peft on CPU.

Each method runs twice with the same hyper-parameters: jpeft (``jax.jit(train_step)``)
and peft over transformers (torch eager). Both load the same random base from disk
(written once by ``jpeft.models.hf.save_pretrained``), train on the same batch of random ids
with AdamW in fp32 and take the next-token loss on every token. Each (method,
implementation) pair runs in its own process, so its peak RSS (``VmHWM``, the JAX or
torch runtime included) is its own. The loss of step 1 (about ln(vocab) on this
near-zero random base) is the same on both sides.

Methods, the same on both sides (encoder widths are both libraries' defaults, so the
trainable-parameter counts must agree):

- ``lora``: LoRA r=16, alpha=32 on q_proj/v_proj.
- ``qlora``: the same LoRA over a base whose decoder linears are NF4 with double
  quantization (jpeft: ``hf.load_pretrained(path, quantize="nf4")``; peft: transformers
  + bitsandbytes 4-bit), so the lora and qlora rows compare one config.
- ``prompt``, ``ptuning`` (P-tuning v1, MLP encoder), ``prefix`` (with projection),
  ``ptuning-v2`` (prefix without projection), ``multitask`` (2 tasks, rank 1; rows
  alternate tasks): 20 virtual tokens.
- ``llama-adapter``: adaption prompts of 10 tokens in the top 2 layers.

The default ``--intermediate`` is 704, not the other benchmarks' 688: jpeft's NF4
kernel layout needs every linear's input width to be a multiple of the block size (64).

Prints a markdown table and the command that produced it::

    python bench/train_step.py --threads 2
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import shlex
import sys
import tempfile
import time
from collections.abc import Callable
from importlib.metadata import version
from typing import Any

import numpy as np
from common import (
    config_from,
    model_parser,
    peak_rss,
    pin_threads,
    run_self,
    seconds_per_call,
    write_checkpoint,
)

LR, WEIGHT_DECAY = 2e-4, 0.01
NF4_INTERMEDIATE = 704  # a multiple of the NF4 block size, unlike model_parser's 688
IMPLEMENTATIONS = {"jpeft": "jpeft (jax.jit)", "peft": "peft (torch eager)"}
PACKAGES = ("jax", "torch", "transformers", "peft", "bitsandbytes")
Step = Callable[[], float]


@dataclasses.dataclass(frozen=True)
class Method:
    """One PEFT method with the same hyper-parameters in jpeft and in peft.

    Attributes:
        jpeft: the jpeft method class's name; ``options`` are its arguments.
        peft: the peft config class's name; ``peft_options`` are its arguments.
        quantized: the base's decoder linears are NF4 with double quantization.
        tasks: number of tasks of a multitask method (row ``i`` is task ``i % tasks``).
    """

    jpeft: str
    options: dict[str, Any]
    peft: str
    peft_options: dict[str, Any]
    quantized: bool = False
    tasks: int = 0


_LORA = {"r": 16, "alpha": 32, "targets": ("q_proj", "v_proj")}
_PEFT_LORA = {"r": 16, "lora_alpha": 32, "target_modules": ["q_proj", "v_proj"]}
_VIRTUAL = {"num_virtual_tokens": 20}
_MULTITASK = {**_VIRTUAL, "num_tasks": 2, "num_ranks": 1}
_ADAPTER = {"adapter_len": 10, "adapter_layers": 2}
METHODS = {
    "lora": Method("LoRA", _LORA, "LoraConfig", _PEFT_LORA),
    "qlora": Method("QLoRA", _LORA, "LoraConfig", _PEFT_LORA, quantized=True),
    "prompt": Method("PromptTuning", _VIRTUAL, "PromptTuningConfig", _VIRTUAL),
    "ptuning": Method(
        "PTuning",
        {**_VIRTUAL, "encoder_type": "MLP"},
        "PromptEncoderConfig",
        {**_VIRTUAL, "encoder_reparameterization_type": "MLP"},
    ),
    "prefix": Method(
        "PrefixTuning",
        {**_VIRTUAL, "prefix_projection": True},
        "PrefixTuningConfig",
        {**_VIRTUAL, "prefix_projection": True},
    ),
    "ptuning-v2": Method(
        "PTuningV2", _VIRTUAL, "PrefixTuningConfig", {**_VIRTUAL, "prefix_projection": False}
    ),
    "multitask": Method(
        "MultitaskPromptTuning", _MULTITASK, "MultitaskPromptTuningConfig", _MULTITASK, tasks=2
    ),
    "llama-adapter": Method("LlamaAdapter", _ADAPTER, "AdaptionPromptConfig", _ADAPTER),
}


def jpeft_step(
    method: Method, path: str, ids: np.ndarray, tasks: np.ndarray | None
) -> tuple[Step, int]:
    """``(step() -> loss, trainable params)`` of jpeft's jitted, donated ``train_step``."""
    import jax
    import jax.numpy as jnp
    import optax

    import jpeft
    from jpeft.models import hf, llama
    from jpeft.train import TrainState, train_step
    from jpeft.train.build import count

    cfg, base = hf.load_pretrained(path, quantize="nf4" if method.quantized else None)
    params = getattr(jpeft, method.jpeft)(**method.options).init(jax.random.key(1), base, cfg)
    trainable, frozen = jpeft.split(params)
    tx = optax.adamw(LR, weight_decay=WEIGHT_DECAY)
    state = TrainState.create(apply_fn=llama.Llama(cfg).apply, trainable=trainable, tx=tx)
    ones = jnp.ones(ids.shape, jnp.int32)
    batch = {"input_ids": jnp.asarray(ids, jnp.int32), "attention_mask": ones, "loss_mask": ones}
    if tasks is not None:
        batch["task_ids"] = jnp.asarray(tasks, jnp.int32)
    step = jax.jit(train_step, donate_argnums=0)
    holder = {"state": state}

    def run() -> float:
        holder["state"], metrics = step(holder["state"], frozen, batch)
        return float(metrics["loss"])

    return run, count(trainable)


def peft_step(
    method: Method, path: str, ids: np.ndarray, tasks: np.ndarray | None
) -> tuple[Step, int]:
    """``(step() -> loss, trainable params)`` of peft over transformers (torch eager)."""
    import peft
    import torch
    import transformers

    torch.set_num_threads(len(os.sched_getaffinity(0)))  # the cores pin_threads left
    model = transformers.LlamaForCausalLM.from_pretrained(
        path, dtype=torch.float32, **_bnb_options(method)
    )
    config = getattr(peft, method.peft)(task_type="CAUSAL_LM", **method.peft_options)
    model = peft.get_peft_model(model, config).train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, LR, weight_decay=WEIGHT_DECAY)
    inputs = {"input_ids": torch.tensor(ids), "labels": torch.tensor(ids)}
    if tasks is not None:
        inputs["task_ids"] = torch.tensor(tasks)

    def run() -> float:
        loss = model(**inputs).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()

    return run, sum(p.numel() for p in trainable)


def _bnb_options(method: Method) -> dict[str, Any]:
    """``from_pretrained`` options for a bitsandbytes NF4 + double-quantized base on CPU."""
    if not method.quantized:
        return {}
    import torch
    import transformers

    bnb = transformers.BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.float32,
    )
    return {"quantization_config": bnb, "device_map": "cpu"}


def measure(name: str, implementation: str, path: str, args: argparse.Namespace) -> dict:
    """One (method, implementation) run in this process.

    Returns seconds per step, the loss of step 1, the trainable params and this
    process's peak RSS in bytes.
    """
    method = METHODS[name]
    ids = np.random.default_rng(0).integers(0, args.vocab, (args.batch, args.seq))
    tasks = np.arange(args.batch) % method.tasks if method.tasks else None
    build = jpeft_step if implementation == "jpeft" else peft_step
    step, trainable = build(method, path, ids, tasks)
    loss = step()
    seconds = seconds_per_call(step, args.repeats)
    return {"seconds": seconds, "loss": loss, "trainable": trainable, "peak_rss": peak_rss()}


def table(results: dict[tuple[str, str], dict], tokens: int) -> list[str]:
    """Markdown rows; the ratios are against the peft row of the same method.

    Example:
        >>> run = {"seconds": 0.5, "loss": 10.37, "trainable": 1280, "peak_rss": 2**29}
        >>> table({("prompt", "jpeft"): run, ("prompt", "peft"): run}, 1024)[2]
        '| prompt | jpeft (jax.jit) | 500.0 | 2,048 | 1.00x | 512 | 1.00x | 1,280 | 10.37 |'
    """
    rows = [
        "| method | implementation | ms / step | tokens/s | tokens/s vs peft | peak RSS MiB "
        "| memory vs peft | trainable params | loss (step 1) |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for (name, impl), run in results.items():
        peft_run = results[name, "peft"]
        rows.append(
            f"| {name} | {IMPLEMENTATIONS[impl]} | {run['seconds'] * 1e3:.1f} "
            f"| {tokens / run['seconds']:,.0f} | {peft_run['seconds'] / run['seconds']:.2f}x "
            f"| {run['peak_rss'] / 2**20:.0f} | {run['peak_rss'] / peft_run['peak_rss']:.2f}x "
            f"| {run['trainable']:,} | {run['loss']:.2f} |"
        )
    return rows


def qlora_vs_lora(results: dict[tuple[str, str], dict]) -> str | None:
    """One line: QLoRA's step time and peak RSS relative to LoRA's, per implementation."""
    if not {(m, i) for m in ("lora", "qlora") for i in IMPLEMENTATIONS} <= results.keys():
        return None
    parts = []
    for impl in IMPLEMENTATIONS:
        q, lo = results["qlora", impl], results["lora", impl]
        parts.append(
            f"{impl} {q['seconds'] / lo['seconds']:.2f}x step time, "
            f"{q['peak_rss'] / lo['peak_rss']:.2f}x peak RSS"
        )
    return "QLoRA / LoRA (same config): " + "; ".join(parts)


def main() -> None:
    parser = model_parser(__doc__.splitlines()[0], repeats=3)
    parser.set_defaults(intermediate=NF4_INTERMEDIATE)
    parser.add_argument("--methods", nargs="+", choices=list(METHODS), default=list(METHODS))
    parser.add_argument("--run", nargs=3, help=argparse.SUPPRESS)  # METHOD IMPL CHECKPOINT
    args = parser.parse_args()
    pin_threads(args.threads)
    if args.run:
        print(json.dumps(measure(*args.run, args)))
        return
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        write_checkpoint(tmp, config_from(args))
        for name in args.methods:
            for impl in IMPLEMENTATIONS:
                start = time.perf_counter()
                results[name, impl] = run_self("--run", name, impl, tmp)
                elapsed = time.perf_counter() - start
                print(f"{name} {impl}: {elapsed:.0f}s", file=sys.stderr, flush=True)
    versions = ", ".join(f"{package} {version(package)}" for package in PACKAGES)
    print(f"`{shlex.join(['python', *sys.argv])}`\n")
    print(
        f"{platform.processor() or platform.machine()}, threads={args.threads}, fp32, "
        f"B={args.batch} T={args.seq}, hidden {args.hidden}, intermediate {args.intermediate}, "
        f"{args.layers} layers, vocab {args.vocab}, AdamW; {versions}\n"
    )
    print("\n".join(table(results, args.batch * args.seq)))
    line = qlora_vs_lora(results)
    if line:
        print(f"\n{line}")


if __name__ == "__main__":
    main()
