"""The fused NF4/FP4 kernels: each compiles for an H100, and a QLoRA step keeps no 16-bit weight.

Run (the H100 exists only as a compile target; needs the CUDA PJRT plugin, see
``shared/tools/deviceless-gpu-compile.md``)::

    JAX_PLATFORMS=cpu python bench/nf4_kernels.py
    python bench/nf4_kernels.py --smoke     # CPU, Pallas interpret mode, tiny shapes (CI)

Table 1: every kernel (decode, gemm, input_grad) for every variant (NF4/FP4, with and
without double quantization) is lowered and compiled for the target; it shows the
compile time and the Triton kernels in the compiled program. With ``--smoke`` the
kernels run in interpret mode on CPU and the table shows their largest error against
XLA's dequantize-then-dot instead.

Table 2: a QLoRA train step (``jpeft.QLoRA`` on every linear, ``jpeft.train.train_step``,
bf16 compute, full remat, scanned layers) compiled with the 4-bit weights' implementation
``"xla"`` and the default (the kernels on CUDA; ``"interpret"`` with ``--smoke``). The HLO check:
in the optimized HLO (``compiled.as_text()``), count the instructions *outside fusion
bodies* that produce a buffer (not parameters, tuples, their elements, bitcasts or loops)
and whose result is a floating-point array with a projection's weight shape: ``[in, out]``
or ``[out, in]``, per layer or with the leading layer axis (halved along either axis on
the two-device meshes). The dequantize-then-dot path writes one per projection; the kernel
path must write none. Peak and temp bytes come from ``compiled.memory_analysis()``.
"""

from __future__ import annotations

import argparse
import os
import sys

if "--smoke" in sys.argv:  # the sharded rows need two host devices (set before jax starts)
    os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=2")

import re
import shlex
import time
from typing import Any

import jax
import jax.numpy as jnp
import optax

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from deviceless import abstract, compile_on, gpu_target_available, peak_bytes, target_mesh

import jpeft
from jpeft import quant
from jpeft.models import llama
from jpeft.models.config import LlamaConfig
from jpeft.quant import kernels
from jpeft.train import TrainState, train_step
from jpeft.train.sharding import batch_sharding, make_mesh, state_shardings, tree_shardings

VARIANTS = [("nf4", True), ("nf4", False), ("fp4", True), ("fp4", False)]
KERNELS = {"decode": kernels.decode, "gemm": kernels.gemm, "input_grad": kernels.input_grad}
_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%?[\w.\-]+\s*=\s*(\S+)\s+([\w\-]+)\(")
_ALIASES = {"parameter", "get-tuple-element", "tuple", "bitcast", "while", "conditional", "call"}
_ARRAY = re.compile(r"\b(bf16|f16|f32)\[([\d,]*)\]")
_FUSION_BODY = re.compile(r"calls=%?([\w.\-]+)")
_COMPUTATION = re.compile(r"^(?:ENTRY\s+)?%?([\w.\-]+)\s")


def _weight(k: int, n: int, quant_type: str, double_quant: bool) -> quant.QuantizedWeight:
    w = jax.random.normal(jax.random.key(0), (k, n), jnp.float32) * 0.02
    return quant.quantize(w, quant_type, 64, double_quant)


def _operands(name: str, m: int, w: quant.QuantizedWeight) -> jax.ShapeDtypeStruct:
    width = w.out_features if name == "input_grad" else w.in_features
    return jax.ShapeDtypeStruct((m, width), jnp.bfloat16)


def kernel_rows(smoke: bool) -> list[list[str]]:
    """Table 1: compile (or, with ``smoke``, interpret) each kernel for each variant."""
    k, n = (128, 64) if smoke else (4096, 14336)
    rows_per_kernel = {"decode": 16, "gemm": 256, "input_grad": 256}
    mesh = None if smoke else target_mesh()
    rows = []
    for quant_type, double_quant in VARIANTS:
        w = _weight(k, n, quant_type, double_quant)
        variant = f"{quant_type}{'+DQ' if double_quant else ''}"
        for name, fn in KERNELS.items():
            m = rows_per_kernel[name]
            if smoke:
                x = jax.random.normal(jax.random.key(1), _operands(name, m, w).shape)
                x = x.astype(jnp.bfloat16)
                got = fn(x, w, interpret=True).astype(jnp.float32)
                dense = w.dequantize(jnp.bfloat16).astype(jnp.float32)
                want = x.astype(jnp.float32) @ (dense.T if name == "input_grad" else dense)
                err = float(jnp.max(jnp.abs(got - want)) / jnp.max(jnp.abs(want)))
                rows.append([name, variant, str(m), f"{k}x{n}", "interpret", f"{err:.1e}"])
                continue
            start = time.perf_counter()
            args = abstract((_operands(name, m, w), w), mesh)
            compiled = compile_on(mesh, lambda x, w, fn=fn: fn(x, w), *args)
            seconds = time.perf_counter() - start
            triton = compiled.as_text().count('custom_call_target="__gpu$xla.gpu.triton"')
            rows.append([name, variant, str(m), f"{k}x{n}", f"{seconds:.1f} s", str(triton)])
    return rows


def _weight_shapes(cfg: LlamaConfig, shards: int) -> set[tuple[int, ...]]:
    """Every projection's ``[in, out]`` and ``[out, in]``, per layer and layer-stacked, whole
    and (with ``shards`` > 1) split along either axis."""
    h, i, layers = cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers
    q, kv = cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim
    pairs = {(h, q), (h, kv), (q, h), (h, i), (i, h)}
    pairs |= {(a // shards, b) for a, b in pairs} | {(a, b // shards) for a, b in pairs}
    shapes = set()
    for a, b in pairs:
        shapes |= {(a, b), (b, a), (layers, a, b), (layers, b, a)}
    return shapes


def weight_buffers(hlo: str, shapes: set[tuple[int, ...]]) -> int:
    """Materialised float arrays of a weight shape in ``hlo``: single-array results of
    instructions outside fusion bodies, except those that only alias a buffer
    (parameters, tuples and their elements, bitcasts, loops)."""
    bodies = set(_FUSION_BODY.findall(hlo))
    count, inside = 0, False
    for line in hlo.splitlines():
        header = _COMPUTATION.match(line)  # computations start in column 0, instructions not
        if header:
            inside = header.group(1) in bodies
            continue
        match = _INSTRUCTION.match(line)
        if inside or not match or match.group(2) in _ALIASES:
            continue
        array = _ARRAY.fullmatch(match.group(1).split("{")[0])  # tuples do not match
        if array and tuple(int(d) for d in array.group(2).split(",") if d) in shapes:
            count += 1
    return count


def _step_args(cfg: LlamaConfig, batch: int, seq: int, quant_type: str, double_quant: bool):
    model = llama.Llama(cfg, dtype=jnp.bfloat16, remat="full", attention_impl="xla")
    method = jpeft.QLoRA(
        r=16, alpha=32, targets="all-linear", quant_type=quant_type, double_quant=double_quant
    )

    def make() -> tuple[Any, Any, dict[str, jax.Array]]:
        params = method.init(jax.random.key(1), llama.init_params(jax.random.key(0), cfg), cfg)
        trainable, frozen = jpeft.split(params)
        frozen = jax.tree.map(
            lambda a: a.astype(jnp.bfloat16) if a.dtype == jnp.float32 and a.ndim > 1 else a,
            frozen,
        )
        state = TrainState.create(apply_fn=model.apply, trainable=trainable, tx=optax.adamw(2e-4))
        ids = jnp.zeros((batch, seq), jnp.int32)
        data = {"input_ids": ids, "attention_mask": ids + 1, "loss_mask": ids + 1}
        return state, frozen, data

    return jax.eval_shape(make)


def _placed(tree: Any, shardings: Any) -> Any:
    """``tree`` as ShapeDtypeStructs carrying ``shardings`` (a tree, or one for every leaf)."""
    if not isinstance(shardings, type(tree)):
        shardings = jax.tree.map(lambda _: shardings, tree)
    place = lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s)
    return jax.tree.map(place, tree, shardings)


def step_rows(smoke: bool) -> list[list[str]]:
    """Table 2: the compiled QLoRA step with the XLA path and with the kernels, on one
    device and sharded over two (jpeft's logical-axis rules: fsdp, tensor)."""
    cfg = LlamaConfig(
        # No activation ([tokens, width], tokens 96/128/192/256 with padding) and no
        # lm_head ([448, 500], padded to 512) shares a projection's (or half its) shape.
        vocab_size=500,
        hidden_size=448,
        intermediate_size=1152,
        num_hidden_layers=2,
        num_attention_heads=7,
        num_key_value_heads=1,
        max_position_embeddings=256,
    )
    batch, seq = 2, 96
    kernels_on = "interpret" if smoke else None
    runs = [("data=1", v) for v in (VARIANTS[:1] if smoke else VARIANTS)]
    runs += [(spec, VARIANTS[0]) for spec in ("fsdp=2", "tensor=2")[: 1 if smoke else 2]]
    rows = []
    for spec, (quant_type, double_quant) in runs:
        devices = target_mesh((2,), prefer_gpu=not smoke).devices.reshape(-1)
        mesh = make_mesh(spec, devices=devices[: 1 if spec == "data=1" else 2])
        state, frozen, data = _step_args(cfg, batch, seq, quant_type, double_quant)
        for implementation in ("xla", kernels_on):
            frozen_with = quant.with_implementation(frozen, implementation)
            args = (
                _placed(state, state_shardings(state, mesh)),
                _placed(frozen_with, tree_shardings(frozen_with, mesh)),
                _placed(data, batch_sharding(mesh)),
            )
            compiled = jax.jit(train_step, donate_argnums=0).lower(*args).compile()
            hlo = compiled.as_text()
            temp = compiled.memory_analysis().temp_size_in_bytes
            rows.append(
                [
                    f"{quant_type}{'+DQ' if double_quant else ''}",
                    spec.replace("data=1", "1 device"),
                    implementation or "kernels on CUDA",
                    str(weight_buffers(hlo, _weight_shapes(cfg, mesh.size))),
                    str(hlo.count('custom_call_target="__gpu$xla.gpu.triton"')),
                    f"{peak_bytes(compiled) / 2**20:.1f}",
                    f"{temp / 2**20:.1f}",
                ]
            )
    return rows


def _print(title: str, header: list[str], rows: list[list[str]]) -> None:
    print(f"\n{title}\n")
    print("| " + " | ".join(header) + " |")
    print("|" + "|".join("---" for _ in header) + "|")
    for row in rows:
        print("| " + " | ".join(row) + " |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--smoke", action="store_true", help="CPU, interpret mode, tiny shapes")
    args = parser.parse_args()
    if not args.smoke and not gpu_target_available():
        raise SystemExit(
            "no H100 compile target here (install jax-cuda12-plugin matching jax, see "
            "shared/tools/deviceless-gpu-compile.md), or run with --smoke"
        )
    target = "CPU (interpret mode)" if args.smoke else "H100 SXM (deviceless compile)"
    last = "max rel. err vs XLA" if args.smoke else "Pallas kernel calls"
    _print(
        f"Kernels on {target}",
        ["kernel", "variant", "M", "weight [in x out]", "compile", last],
        kernel_rows(args.smoke),
    )
    _print(
        f"QLoRA train step on {target} (hidden 448, intermediate 1152, heads 7/1, 2 layers, "
        "B=2, T=96, bf16)",
        [
            "variant",
            "mesh",
            "4-bit matmul",
            "weight-shaped buffers",
            "Pallas kernel calls",
            "peak MiB",
            "temp MiB",
        ],
        step_rows(args.smoke),
    )
    print(f"\ncommand: {shlex.join([os.path.basename(sys.executable), *sys.argv])}")


if __name__ == "__main__":
    main()
