"""The measurements of ``bench/gpu.py``, one function per part; each returns table rows.

Every part reads the same random LLaMA (``path``, written by transformers in bf16) and
imports its framework itself, so a part's process holds only JAX or only torch.
"""

from __future__ import annotations

import dataclasses
import math
import re
import time
from collections.abc import Callable
from typing import Any

from common import config_from

LORA = {"r": 16, "alpha": 32, "dropout": 0.0, "targets": "all-linear"}
LR = 2e-4


@dataclasses.dataclass(frozen=True)
class Sizes:
    """The model shape and the sizes every part runs at.

    ``rotate_bytes``: the weight copies one timed matmul call cycles through (several
    times the L2, so that each product reads its weight from device memory).
    """

    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int
    batch: int
    seq: int
    prompt: int
    new_tokens: int
    decode_batches: tuple[int, ...]
    matmul: tuple[int, int]
    matmul_m: tuple[int, ...]
    rotate_bytes: int
    repeats: int

    def config(self) -> Any:
        """The :class:`jpeft.models.config.LlamaConfig` of this shape."""
        return config_from(self)


@dataclasses.dataclass(frozen=True)
class Row:
    """One measurement. ``ref`` is the key of the row it is compared with (itself for a
    reference); ``speed`` is its rate (calls, tokens... per second; higher is faster)."""

    key: str
    ref: str
    part: str
    case: str
    impl: str
    seconds: float
    speed: float
    throughput: str = ""
    tokens_per_s: float | None = None
    peak_bytes: int | None = None
    device: str = ""


def seconds_per_call(fn: Callable[[], Any], repeats: int, block: Callable[[Any], Any]) -> float:
    """Best of 3 rounds of ``repeats`` calls queued back to back (``block`` waits for one).

    Example:
        >>> seconds_per_call(lambda: None, 2, lambda out: out) < 1.0
        True
    """
    block(fn())  # compile and warm up
    best = math.inf
    for _ in range(3):
        start = time.perf_counter()
        for _ in range(repeats):
            out = fn()
        block(out)
        best = min(best, (time.perf_counter() - start) / repeats)
    return best


def matmul(s: Sizes, path: str) -> list[Row]:
    """``x [M, in] @ W [in, out]``: bf16, NF4 through XLA, NF4 through jpeft's entry point."""
    import jax
    import jax.numpy as jnp

    from jpeft import quant
    from jpeft.models import linear
    from jpeft.models.context import Context

    bf16 = jnp.bfloat16
    d_in, d_out = s.matmul
    w = 0.02 * jax.random.normal(jax.random.key(0), (d_in, d_out), bf16)
    w4 = quant.quantize(w, "nf4", blocksize=64, double_quant=True)

    def copies(tree: Any) -> list[Any]:
        size = sum(a.size * a.dtype.itemsize for a in jax.tree.leaves(tree))
        return [jax.tree.map(jnp.copy, tree) for _ in range(max(2, -(-s.rotate_bytes // size)))]

    ctx = Context(bf16)
    impls = {
        "bf16 matmul": (copies(w), lambda w, x: x @ w),
        "NF4, XLA dequantize + matmul": (copies(w4), lambda w, x: x @ quant.dequantize(w, bf16)),
        "NF4, jpeft matmul": (copies(w4), lambda w, x: linear.matmul(w, x, ctx, "up_proj")),
    }
    rows = []
    for m in s.matmul_m:
        x = jax.random.normal(jax.random.key(m), (m, d_in), bf16)
        for name, (ws, f) in impls.items():
            call = jax.jit(lambda ws, x, f=f: [f(w, x) for w in ws]).lower(ws, x).compile()
            targets = re.findall(r'custom_call_target="([^"]+)"', call.as_text())
            kernel = "Pallas" if any(re.search("triton|mosaic", t) for t in targets) else "XLA"
            seconds = seconds_per_call(
                lambda call=call, ws=ws, x=x: call(ws, x), 4 * s.repeats, jax.block_until_ready
            ) / len(ws)
            rows.append(
                Row(
                    key=f"matmul/{m}/{name}",
                    ref=f"matmul/{m}/bf16 matmul",
                    part="NF4 matmul",
                    case=f"M={m}, [{d_in} x {d_out}]",
                    impl=f"{name} ({kernel})" if "jpeft" in name else name,
                    seconds=seconds,
                    speed=1 / seconds,
                    throughput=f"{2 * m * d_in * d_out / seconds / 1e12:.1f} TFLOP/s",
                )
            )
    return rows


def decode(s: Sizes, path: str) -> list[Row]:
    """jpeft ``generate`` tokens/s: bf16, LoRA (merged per call) and NF4."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    import jpeft
    from jpeft.models import generate, hf

    bf16 = jnp.bfloat16
    cfg, base = hf.load_pretrained(path, dtype=bf16)
    models = {
        "jpeft bf16": base,
        "jpeft LoRA r=16 (merged per call)": jpeft.LoRA(**LORA).init(jax.random.key(0), base, cfg),
        "jpeft NF4": hf.load_pretrained(path, dtype=bf16, quantize="nf4")[1],
    }
    rows = []
    for name, params in models.items():
        for b in s.decode_batches:
            ids = np.random.default_rng(b).integers(3, s.vocab, (b, s.prompt))

            def run(params: Any = params, ids: np.ndarray = ids) -> jax.Array:
                kw = dict(max_new_tokens=s.new_tokens, stop_tokens=(), dtype=bf16)
                return generate.generate(params, cfg, ids, **kw).tokens

            seconds = seconds_per_call(run, s.repeats, jax.block_until_ready)
            rows.append(_decode_row(s, b, name, name, seconds))
    return rows


def decode_transformers(s: Sizes, path: str) -> list[Row]:
    """transformers ``generate`` tokens/s (bf16, SDPA, greedy, static cache when available)."""
    import torch
    import transformers

    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = transformers.LlamaForCausalLM.from_pretrained(
        path, dtype=torch.bfloat16, attn_implementation="sdpa"
    ).to(device)
    static = hasattr(transformers, "StaticCache")
    config = transformers.GenerationConfig(
        do_sample=False,
        max_new_tokens=s.new_tokens,
        min_new_tokens=s.new_tokens,
        pad_token_id=0,
        cache_implementation="static" if static else None,
    )
    rows = []
    for b in s.decode_batches:
        ids = torch.randint(3, s.vocab, (b, s.prompt), device=device)

        def run(ids: torch.Tensor = ids) -> torch.Tensor:
            with torch.inference_mode():
                mask = torch.ones_like(ids)
                return model.generate(ids, attention_mask=mask, generation_config=config)

        seconds = seconds_per_call(run, s.repeats, _torch_sync)
        name = f"transformers generate ({'static' if static else 'dynamic'} cache)"
        rows.append(_decode_row(s, b, "transformers", name, seconds))
    return rows


def _tokens_row(tokens: int, seconds: float, **fields: Any) -> Row:
    """A row whose rate is ``tokens`` per call of ``seconds``."""
    rate = tokens / seconds
    return Row(seconds=seconds, speed=rate, throughput=f"{rate:,.0f} tokens/s", **fields)


def _decode_row(s: Sizes, b: int, key: str, name: str, seconds: float) -> Row:
    case = f"batch {b}, prompt {s.prompt}, {s.new_tokens} new"
    ref = f"decode/{b}/transformers"
    return _tokens_row(
        b * s.new_tokens,
        seconds,
        key=f"decode/{b}/{key}",
        ref=ref,
        part="decode",
        case=case,
        impl=name,
    )


def _torch_sync(_: Any) -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def train(s: Sizes, path: str, method: str, optimizer: str = "adamw") -> list[Row]:
    """jpeft's train step as ``jpeft train`` builds it (:mod:`jpeft.train.build`)."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from jpeft.models import hf
    from jpeft.train import build
    from jpeft.train.config import RunConfig
    from jpeft.train.sharding import make_mesh, shard_batch

    run = RunConfig(
        method=method,
        method_options={method: LORA},
        dtype="bfloat16",
        compute_dtype="bfloat16",
        remat="full",
        optimizer=optimizer,
        lr=LR,
        max_grad_norm=None,
        warmup_steps=0,
        seq_len=s.seq,
        batch_size=s.batch,
    )
    quantize = "nf4" if method == "qlora" else None
    cfg, base = hf.load_pretrained(path, dtype=jnp.bfloat16, quantize=quantize)
    params = build.init_params(run, build.method(run), base, cfg)
    mesh = make_mesh(run.mesh)
    step, state, frozen = build.train_state(run, params, cfg, mesh)
    ids = np.random.default_rng(0).integers(0, s.vocab, (s.batch, s.seq)).astype(np.int32)
    ones = np.ones_like(ids)
    batch = shard_batch({"input_ids": ids, "attention_mask": ones, "loss_mask": ones}, mesh)
    holder = {"state": state}

    def one() -> jax.Array:
        holder["state"], metrics = step(holder["state"], frozen, batch)
        return metrics["loss"]

    seconds = seconds_per_call(one, s.repeats, jax.block_until_ready)
    device = jax.devices()[0]
    paged = optimizer == "paged-adamw"
    return [
        _train_row(
            s,
            key=f"train/{method}/jpeft" + ("-paged" if paged else ""),
            ref=f"train/{method}/" + ("jpeft" if paged else "peft"),
            name=f"jpeft {'QLoRA' if quantize else 'LoRA'}" + (", paged AdamW" if paged else ""),
            seconds=seconds,
            peak=(device.memory_stats() or {}).get("peak_bytes_in_use"),
            device=device.device_kind,
        )
    ]


def train_peft(s: Sizes, path: str, method: str) -> list[Row]:
    """transformers + peft (+ bitsandbytes 4-bit for QLoRA), gradient checkpointing, AdamW."""
    import peft
    import torch
    import transformers

    cuda = torch.cuda.is_available()
    options: dict[str, Any] = {"dtype": torch.bfloat16, "attn_implementation": "sdpa"}
    if method == "qlora":
        options["quantization_config"] = transformers.BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16,
        )
        options["device_map"] = {"": 0 if cuda else "cpu"}
    model = transformers.LlamaForCausalLM.from_pretrained(path, **options)
    if method != "qlora":
        model.to("cuda" if cuda else "cpu")
    model.config.use_cache = False
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    config = peft.LoraConfig(
        r=LORA["r"],
        lora_alpha=LORA["alpha"],
        lora_dropout=LORA["dropout"],
        target_modules=LORA["targets"],
        task_type="CAUSAL_LM",
    )
    model = peft.get_peft_model(model, config).train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=LR, weight_decay=0.0, fused=cuda)
    ids = torch.randint(0, s.vocab, (s.batch, s.seq), device=model.device)

    def one() -> torch.Tensor:
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss

    seconds = seconds_per_call(one, s.repeats, _torch_sync)
    return [
        _train_row(
            s,
            key=f"train/{method}/peft",
            ref=f"train/{method}/peft",
            name="transformers + peft" + (" + bitsandbytes" if method == "qlora" else ""),
            seconds=seconds,
            peak=torch.cuda.max_memory_allocated() if cuda else None,
            device=torch.cuda.get_device_name() if cuda else "cpu",
        )
    ]


def _train_row(
    s: Sizes, key: str, ref: str, name: str, seconds: float, peak: int | None, device: str
) -> Row:
    case = f"{'QLoRA' if 'qlora' in key else 'LoRA'}, B={s.batch} T={s.seq}"
    tokens = s.batch * s.seq
    return _tokens_row(
        tokens,
        seconds,
        key=key,
        ref=ref,
        part="train step",
        case=case,
        impl=name,
        tokens_per_s=tokens / seconds,
        peak_bytes=peak,
        device=device,
    )


PARTS: dict[str, Callable[[Sizes, str], list[Row]]] = {
    "matmul": matmul,
    "decode": decode,
    "decode-transformers": decode_transformers,
    "train-lora": lambda s, path: train(s, path, "lora"),
    "train-qlora": lambda s, path: train(s, path, "qlora"),
    "train-peft-lora": lambda s, path: train_peft(s, path, "lora"),
    "train-peft-qlora": lambda s, path: train_peft(s, path, "qlora"),
    "paged": lambda s, path: train(s, path, "lora", "paged-adamw"),
}
"""Each part in the order the table shows it."""
