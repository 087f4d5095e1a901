"""Device memory and FLOPs of jpeft's real train step, compiled for an H100 without one.

Each row builds its run the way the command line does (``jpeft.train.build``: the method
with its command-line defaults, the optimizer, the schedule, the model) from abstract
params (``jax.eval_shape``: nothing as large as a 7B model is ever allocated), and compiles
the step of ``jpeft.train.sharding.jit_train_step`` (the CLI's, state donated, paged state
in ``pinned_host`` memory) for one H100 SXM (``bench/deviceless.py``). Reported:

- peak: device bytes of the compiled program (arguments + outputs - donated aliases +
  temporaries), in GB (1e9 bytes);
- host in/out: its arguments and results in pinned host memory (a paged optimizer's
  state, which must come back there), in GB; a row whose program computes on host memory
  (XLA's fallback when an operation mixes host and device buffers) is flagged;
- TFLOP: matmul FLOPs of one step counted from the traced program (rematerialized
  forward passes included), in 1e12.

Rows (bf16 base and compute, AdamW unless stated, LoRA on all linear layers):

- 1.1B (hidden 2048, 22 layers, 32/4 heads, MLP 5632, vocab 32000), B=4, T=2048: LoRA
  r=16, QLoRA r=16 (NF4 + double quantization), and every method of the prompt family
  and the adapters with their command-line defaults;
- 7B (hidden 4096, 32 layers, 32 heads, MLP 11008), B=1, T=2048: QLoRA r=64 with AdamW,
  8-bit AdamW and the paged AdamW;
- Llama-3-8B shape (8 KV heads, MLP 14336, vocab 128,256), B=1, T=2048: QLoRA r=16.

``--attention`` and ``--remat`` set the run's attention implementation and remat policy
(the ``RunConfig`` defaults otherwise); the table shows what the model was built with.
``--smoke`` runs the same code at tiny sizes on the CPU backend (no CUDA plugin needed; CI
runs it). Prints a markdown table and the command that produced it::

    JAX_PLATFORMS=cpu python bench/compiled_memory.py --remat full
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import os
import shlex
import sys
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from deviceless import abstract, gpu_target_available, jaxpr_flops, peak_bytes, target_mesh

import jpeft
from jpeft.models import llama
from jpeft.models.config import LlamaConfig
from jpeft.train import build
from jpeft.train.config import RunConfig, fields
from jpeft.train.sharding import MESH_AXES, jit_train_step
from jpeft.train.step import train_step

ALL_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
SHAPES = {
    "1.1B": LlamaConfig(32000, 2048, 5632, 22, 32, 4),
    "7B": LlamaConfig(32000, 4096, 11008, 32, 32, 32),
    "Llama-3-8B": LlamaConfig(128256, 4096, 14336, 32, 32, 8, rope_theta=500000.0),
}
# --smoke: the same rows at sizes a CPU compiles in seconds (NF4 needs widths % 64 == 0)
SMOKE_SHAPES = {
    "1.1B": LlamaConfig(256, 64, 128, 2, 4, 2),
    "7B": LlamaConfig(256, 64, 128, 2, 4, 4),
    "Llama-3-8B": LlamaConfig(512, 64, 192, 2, 4, 2),
}
# Without a device to autotune on, XLA's Triton GEMM finds no tiling for some odd shapes
# (T + virtual tokens rows); those rows compile with cuBLAS GEMMs instead (marked *).
TILING_ERROR = "Couldn't find output tile sizes"
NO_TRITON_GEMM = {"xla_gpu_enable_triton_gemm": False}
HOST_COMPUTE = '_xla_compute_type="host"'  # an HLO op XLA moved to the host
ENV_SHOWN = ("JAX_PLATFORMS", "XLA_FLAGS")  # printed with the command: they change the figures
PROMPTS_AND_ADAPTERS = ("prompt", "ptuning", "prefix", "ptuning-v2", "adapter", "llama-adapter")


@dataclasses.dataclass(frozen=True)
class Row:
    """One compiled train step: a model shape, a batch, a method and an optimizer."""

    shape: str
    batch: int
    method: str
    optimizer: str = "adamw"
    options: tuple[tuple[str, Any], ...] = ()

    @property
    def name(self) -> str:
        """``shape/method/optimizer``, what ``--rows`` matches."""
        return f"{self.shape}/{self.method}/{self.optimizer}"


def _lora(r: int) -> tuple[tuple[str, Any], ...]:
    return (("r", r), ("alpha", 2.0 * r), ("targets", ALL_LINEAR))


ROWS = (
    Row("1.1B", 4, "lora", options=_lora(16)),
    Row("1.1B", 4, "qlora", options=_lora(16)),
    *(Row("1.1B", 4, method) for method in PROMPTS_AND_ADAPTERS),
    *(Row("7B", 1, "qlora", opt, _lora(64)) for opt in ("adamw", "adamw-8bit", "paged-adamw")),
    Row("Llama-3-8B", 1, "qlora", options=_lora(16)),
)


def run_config(row: Row, args: argparse.Namespace) -> RunConfig:
    """The row's :class:`RunConfig`: bf16, the method's options, ``--attention``/``--remat``.

    Raises:
        SystemExit: ``--attention`` given to a jpeft whose RunConfig has no attention option.
    """
    options: dict[str, Any] = {
        "method": row.method,
        "optimizer": row.optimizer,
        "dtype": "bfloat16",
        "compute_dtype": "bfloat16",
        "seq_len": args.seq,
        "batch_size": row.batch,
        "method_options": {row.method: dict(row.options)},
    }
    if args.remat is not None:
        options["remat"] = args.remat
    if args.attention is not None:
        if "attention_impl" not in fields():
            sys.exit("--attention: this jpeft's RunConfig has no attention_impl option yet")
        options["attention_impl"] = args.attention
    return RunConfig(**options)


def abstract_params(run: RunConfig, cfg: LlamaConfig) -> Any:
    """The method's params over a bf16 base, as ``jax.ShapeDtypeStruct`` (nothing allocated).

    Methods whose ``init`` reads values on the host (encoder initializers) are initialized
    eagerly over a base of zero-stride numpy views instead, which allocates only their own
    (small) nodes.
    """
    method = build.method(run)
    base = jax.eval_shape(lambda: llama.init_params(jax.random.key(0), cfg, jnp.bfloat16))
    try:
        return jax.eval_shape(lambda b: build.init_params(run, method, b, cfg), base)
    except jax.errors.TracerArrayConversionError:
        lazy = jax.tree.map(lambda s: np.broadcast_to(np.zeros((), s.dtype), s.shape), base)
        params = build.init_params(run, method, lazy, cfg)
        return jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype), params)


def measure(
    row: Row, cfg: LlamaConfig, args: argparse.Namespace, mesh: Any, platform: str | None = None
) -> dict[str, Any]:
    """Compile the row's train step on ``mesh``; its peak and host bytes and its FLOPs.

    FLOPs count the branches ``platform`` (``"cuda"`` for the H100 target) lowers, e.g. the
    Pallas flash kernel rather than XLA's attention; None takes the costlier branch.
    """
    run = run_config(row, args)
    trainable, frozen = jpeft.split(abstract_params(run, cfg))
    state = jax.eval_shape(lambda t: build.create_state(run, t, cfg), trainable)
    ids = jax.ShapeDtypeStruct((row.batch, args.seq), jnp.int32)
    batch = {"input_ids": ids, "attention_mask": ids, "loss_mask": ids}
    # an abstract mesh keeps the pinned_host memory kind of a paged state on device targets
    step, state_sh, frozen_sh = jit_train_step(mesh.abstract_mesh, state, frozen)
    placed = lambda tree, sh: jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, sh
    )
    batch = abstract(batch, mesh.abstract_mesh)
    with jax.set_mesh(mesh):
        lowered = step.lower(placed(state, state_sh), placed(frozen, frozen_sh), batch)
        try:
            compiled, note = lowered.compile(), ""
        except jax.errors.JaxRuntimeError as error:
            if TILING_ERROR not in str(error):
                raise
            compiled, note = lowered.compile(compiler_options=NO_TRITON_GEMM), "*"
    model = build.model(run, cfg)
    memory = compiled.memory_analysis()
    return {
        "config": row.shape + note,
        "method": row.method,
        "optimizer": row.optimizer,
        "attention": str(getattr(model, "attention_impl", None)),
        "remat": model.remat,
        "trainable": sum(x.size for x in jax.tree.leaves(trainable)),
        "peak": peak_bytes(compiled),
        "host": int(memory.host_argument_size_in_bytes),
        "host_out": int(memory.host_output_size_in_bytes),
        "host_ops": compiled.as_text().count(HOST_COMPUTE),
        "flops": jaxpr_flops(
            functools.partial(train_step, accum=1), state, frozen, batch, platform=platform
        ),
    }


def table(results: list[dict[str, Any]], smoke: bool) -> str:
    """The markdown table of :func:`measure` results (GB and TFLOP; MB and MFLOP if ``smoke``)."""
    scale, unit, flops_scale, flops_unit = (
        (1e6, "MB", 1e6, "MFLOP") if smoke else (1e9, "GB", 1e12, "TFLOP")
    )
    head = f"| config | method | optimizer | attention | remat | trainable | peak {unit} "
    head += f"| host in/out {unit} | {flops_unit}/step |"
    lines = [head, "|---|---|---|---|---|---:|---:|---:|---:|"]
    for r in results:
        lines.append(
            f"| {r['config']} | {r['method']} | {r['optimizer']} | {r['attention']} "
            f"| {r['remat']} | {r['trainable']:,} | {r['peak'] / scale:.2f} "
            f"| {r['host'] / scale:.2f}/{r['host_out'] / scale:.2f}"
            f"{' (host compute!)' if r['host_ops'] else ''} | {r['flops'] / flops_scale:.2f} |"
        )
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command-line options (see the module docstring)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU backend")
    parser.add_argument("--rows", default="", help="comma-separated substrings of row names")
    parser.add_argument("--seq", type=int, default=None, help="tokens per row (2048; smoke 32)")
    parser.add_argument("--remat", default=None, help="remat policy (RunConfig's default)")
    parser.add_argument("--attention", default=None, help="attention_impl (RunConfig's)")
    args = parser.parse_args(argv)
    if args.seq is None:
        args.seq = 32 if args.smoke else 2048
    return args


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    """Measure the selected rows, print the table and the command; return the results."""
    args = parse_args(argv)
    shapes = SMOKE_SHAPES if args.smoke else SHAPES
    wanted = [w for w in args.rows.split(",") if w]
    rows = [r for r in ROWS if not wanted or any(w in r.name for w in wanted)]
    if not rows:
        sys.exit(f"--rows {args.rows!r} matches none of {[r.name for r in ROWS]}")
    on_gpu = not args.smoke and gpu_target_available()
    if not args.smoke and not on_gpu:
        sys.exit("no H100 target here (CUDA plugin or shared/tools/h100_sxm.txtpb); try --smoke")
    mesh = target_mesh((1, 1, 1), MESH_AXES, prefer_gpu=on_gpu)
    platform = "cuda" if on_gpu else None
    results = [measure(row, shapes[row.shape], args, mesh, platform) for row in rows]
    target = "H100 SXM (deviceless)" if on_gpu else "CPU (smoke)"
    print(f"Compiled train step for {target}, B x T = rows x {args.seq}, bf16:\n")
    print(table(results, smoke=not on_gpu))
    if any(r["config"].endswith("*") for r in results):
        print(
            "\n\\* compiled with xla_gpu_enable_triton_gemm=false (no Triton GEMM tiling "
            "for this shape without a device to autotune on)"
        )
    given = sys.argv[1:] if argv is None else argv
    command = " ".join(shlex.quote(a) for a in ["bench/compiled_memory.py", *given])
    env = " ".join(f"{k}={shlex.quote(os.environ[k])}" for k in ENV_SHOWN if k in os.environ)
    print(f"\n{env + ' ' if env else ''}python {command}")
    return results


if __name__ == "__main__":
    main()
