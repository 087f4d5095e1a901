"""One GPU table: NF4 matmul, decode tokens/s, LoRA/QLoRA train step, paged optimizer.

Parts, each against its reference on the same weights (one random LLaMA of the 1.1B
shape: hidden 2048, 22 layers, 32/4 heads, intermediate 5632, vocab 32000, bf16, written
once by transformers and read by both sides):

- ``matmul``: ``x [M, 4096] @ W [4096, 14336]`` at M = 1, 16, 256, 4096 for a bf16 ``W``,
  for NF4 (double-quantized) through XLA (dequantize, then matmul) and through jpeft's
  matmul entry point (``jpeft.models.linear.matmul`` on a ``jpeft.quant.quantize`` node:
  the Pallas kernel where it is registered; the table says which ran). Each call
  cycles through copies of the weight totalling 256 MiB (over 4x the 50-60 MB L2), so
  every product reads its weight from HBM.
- ``decode``: ``generate`` tokens/s (prompt 128, 128 new tokens, no early stop) at batch
  1 and 16 for the bf16 model, its NF4 version and LoRA (r=16, all linears; merged once
  per call), against transformers ``generate`` (bf16, SDPA, greedy, static cache).
- ``train``: one optimizer step (B=4, T=2048, AdamW, bf16 compute, LoRA r=16 alpha=32 on
  all linears, activation checkpointing on both sides): jpeft LoRA vs transformers +
  peft, jpeft QLoRA (NF4 + double quantization) vs transformers + peft + bitsandbytes.
  Tokens/s, MFU (6 x params x tokens/s over the dense bf16 peak) and peak device memory.
- ``paged``: the jpeft LoRA step with the paged (host-offloaded) AdamW against device AdamW.

On a GPU every part runs in its own process (its peak device memory is its own: JAX's
``peak_bytes_in_use``, torch's ``max_memory_allocated``); the whole run takes about six
minutes on one H100/H200. bitsandbytes is not on the device image: carry its wheel.
Once, where pip reaches PyPI, in the repository root (``.whl/`` is git-ignored)::

    python3 -m pip download bitsandbytes==0.50.2 --no-deps --only-binary=:all: \\
        --python-version 3.12 --implementation cp --platform manylinux_2_24_x86_64 -d .whl

then on the device, in the repository root (``carry: [".whl"]``)::

    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl \\
        && export PYTHONPATH=/tmp/site \\
        && python3 -m pip install -q --no-deps --no-build-isolation -e . \\
        && PYTHONUNBUFFERED=1 python3 bench/gpu.py

``--smoke`` runs every part at tiny sizes on the CPU in one process (torch CPU,
bitsandbytes CPU; a test runs it in CI)::

    JAX_PLATFORMS=cpu python bench/gpu.py --smoke

The measurements live in ``bench/gpu_parts.py``; this file runs them and prints the table
and the issue's targets (#15).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import shlex
import subprocess
import sys
import tempfile
import time

from gpu_parts import PARTS, Row, Sizes

FULL = Sizes(
    hidden=2048,
    layers=22,
    heads=32,
    kv_heads=4,
    intermediate=5632,
    vocab=32000,
    batch=4,
    seq=2048,
    prompt=128,
    new_tokens=128,
    decode_batches=(1, 16),
    matmul=(4096, 14336),
    matmul_m=(1, 16, 256, 4096),
    rotate_bytes=256 * 2**20,
    repeats=5,
)
SMOKE = Sizes(64, 2, 4, 2, 128, 256, 2, 32, 8, 4, (1,), (128, 256), (1, 16), 0, 1)
PEAK_BF16 = (("H100 PCIe", 756e12), ("H100", 989e12), ("H200", 989e12), ("A100", 312e12))
"""Dense bf16 peak FLOP/s by device name (datasheets); ``--peak-tflops`` overrides."""
TARGETS = (
    ("NF4 kernel >= 2x bf16, M=1", "matmul/1/NF4, jpeft matmul", "matmul/1/bf16 matmul", 2.0),
    ("NF4 kernel >= 2x bf16, M=16", "matmul/16/NF4, jpeft matmul", "matmul/16/bf16 matmul", 2.0),
    (
        "NF4 kernel time <= 1.05x bf16, M=4096",
        "matmul/4096/NF4, jpeft matmul",
        "matmul/4096/bf16 matmul",
        1 / 1.05,
    ),
    ("QLoRA step <= 1.1x LoRA step", "train/qlora/jpeft", "train/lora/jpeft", 1 / 1.1),
    ("QLoRA >= 3x peft + bitsandbytes", "train/qlora/jpeft", "train/qlora/peft", 3.0),
    ("LoRA >= 3x peft", "train/lora/jpeft", "train/lora/peft", 3.0),
    ("NF4 decode >= 2x transformers, batch 1", "decode/1/jpeft NF4", "decode/1/transformers", 2.0),
)
"""(target, row key, reference row key, least speed ratio); LoRA MFU >= 55% is read apart."""


def write_model(path: str, s: Sizes) -> None:
    """A random bf16 LLaMA of shape ``s`` saved by transformers (initialized on the GPU if any)."""
    import torch
    import transformers

    raw = s.config().to_hf()
    raw = {k: v for k, v in raw.items() if k not in ("architectures", "model_type")}
    torch.manual_seed(0)
    cuda = torch.cuda.is_available()
    with torch.device("cuda" if cuda else "cpu"):
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**raw))
    model.to(torch.bfloat16).save_pretrained(path)
    del model
    if cuda:
        torch.cuda.empty_cache()


def table(rows: list[Row], params: int, peak_tflops: float | None = None) -> list[str]:
    """Markdown lines: one row per measurement, then the issue's targets met or not.

    MFU is ``6 * params * tokens/s`` over the device's dense bf16 peak.

    Example:
        >>> ref = Row("a", "a", "p", "c", "old", seconds=2.0, speed=0.5, peak_bytes=3 * 10**9)
        >>> new = Row("b", "a", "p", "c", "new", seconds=1.0, speed=1.0, peak_bytes=10**9)
        >>> table([ref, new], params=1)[3]
        '| p | c | new | 1000.0 ms |  |  | 1.00 GB | 2.00x | -2.00 GB |'
    """
    by_key = {r.key: r for r in rows}
    lines = [
        "| part | case | implementation | time | throughput | MFU | peak device memory "
        "| speed vs reference | memory vs reference |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        ref = by_key.get(r.ref)
        ref = None if ref is r else ref
        peak = peak_tflops * 1e12 if peak_tflops else _peak_flops(r.device)
        cells = [
            r.part,
            r.case,
            r.impl,
            f"{r.seconds * 1e6:.1f} us" if r.seconds < 1e-3 else f"{r.seconds * 1e3:.1f} ms",
            r.throughput,
            f"{6 * params * r.tokens_per_s / peak:.1%}" if r.tokens_per_s and peak else "",
            "" if r.peak_bytes is None else f"{r.peak_bytes / 1e9:.2f} GB",
            "" if ref is None else f"{r.speed / ref.speed:.2f}x",
            "",
        ]
        if ref is not None and r.peak_bytes is not None and ref.peak_bytes is not None:
            cells[-1] = f"{(r.peak_bytes - ref.peak_bytes) / 1e9:+.2f} GB"
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    for name, key, ref_key, least in TARGETS:
        if key in by_key and ref_key in by_key:
            ratio = by_key[key].speed / by_key[ref_key].speed
            verdict = "met" if ratio >= least else "NOT met"
            lines.append(
                f"- {name}: {ratio:.2f}x the reference's speed (needs {least:.2f}x): {verdict}"
            )
    return lines


def _peak_flops(device: str) -> float | None:
    return next((peak for name, peak in PEAK_BF16 if name in device), None)


def run_part(name: str, path: str, timeout: float) -> list[Row]:
    """Part ``name`` in a fresh process (so its peak memory is its own); failures are rows."""
    command = [sys.executable, os.path.abspath(__file__), "--part", name, "--model", path]
    try:
        proc = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return [_failed(name, f"timed out after {timeout:.0f} s")]
    if proc.returncode != 0:
        lines = proc.stderr.strip().splitlines() or [f"exit code {proc.returncode}"]
        return [_failed(name, lines[-1])]
    return [Row(**r) for r in json.loads(proc.stdout.strip().splitlines()[-1])]


def _failed(name: str, why: str) -> Row:
    return Row(name, name, name, "", f"FAILED: {why}", seconds=math.nan, speed=math.nan)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny sizes in one process (CI)")
    parser.add_argument("--parts", nargs="+", choices=list(PARTS), default=list(PARTS))
    parser.add_argument("--peak-tflops", type=float, help="dense bf16 peak for MFU")
    parser.add_argument("--timeout", type=float, default=240, help="seconds per part")
    parser.add_argument("--part", choices=list(PARTS), help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.part:  # a child of run_part: one part at full size, its rows as JSON
        print(json.dumps([dataclasses.asdict(r) for r in PARTS[args.part](FULL, args.model)]))
        return
    sizes = SMOKE if args.smoke else FULL
    started = time.perf_counter()
    rows: list[Row] = []
    with tempfile.TemporaryDirectory() as path:
        write_model(path, sizes)
        for name in args.parts:
            if args.smoke:
                rows += PARTS[name](sizes, path)
            else:
                rows += run_part(name, path, args.timeout)
            print(f"{name}: done at {time.perf_counter() - started:.0f} s", file=sys.stderr)
    params = _param_count(sizes)
    command = ["python", "bench/gpu.py", *(sys.argv[1:] if argv is None else argv)]
    print(f"`{shlex.join(command)}`\n")
    print(f"{params:,} params; {_versions()}; {time.perf_counter() - started:.0f} s\n")
    print("\n".join(table(rows, params, args.peak_tflops)))


def _param_count(s: Sizes) -> int:
    import jax

    from jpeft.models import llama

    shapes = jax.eval_shape(lambda: llama.init_params(jax.random.key(0), s.config()))
    return sum(x.size for x in jax.tree.leaves(shapes))


def _versions() -> str:
    from importlib.metadata import PackageNotFoundError, version

    found = []
    for package in ("jax", "torch", "transformers", "peft", "bitsandbytes"):
        try:
            found.append(f"{package} {version(package)}")
        except PackageNotFoundError:
            found.append(f"{package} missing")
    return ", ".join(found)


if __name__ == "__main__":
    main()
