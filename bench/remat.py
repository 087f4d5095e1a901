"""Compiled peak memory and FLOPs of the 1.1B LoRA step for each remat policy.

Compiles jpeft's ``train_step`` for an H100 target on this CPU machine
(:mod:`deviceless`; without the CUDA plugin it falls back to CPU devices and says
so) for TinyLlama-1.1B's shape, B=4, T=2048, bf16, LoRA r=16 on all linear layers,
AdamW (:mod:`lora_step`), once per policy of ``jpeft.models.llama.REMAT_POLICIES`` and
attention implementation. FLOPs per step are matmul FLOPs counted from the jaxpr,
Pallas kernels by their cost estimates, taking the branches a GPU lowers. Prints a
markdown table and the command::

    JAX_PLATFORMS=cpu python bench/remat.py
    JAX_PLATFORMS=cpu python bench/remat.py --policies full proj --attention auto xla
"""

from __future__ import annotations

import argparse
import shlex
import sys

from deviceless import compile_on, gpu_target_available, jaxpr_flops, peak_bytes, target_mesh
from lora_step import lora_step

from jpeft.models.llama import REMAT_POLICIES


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--policies", nargs="+", default=list(REMAT_POLICIES))
    parser.add_argument("--attention", nargs="+", default=["auto"])
    parser.add_argument("--layers", type=int, default=22)
    args = parser.parse_args()
    mesh = target_mesh()
    target = "H100 (deviceless)" if gpu_target_available() else "CPU (no CUDA plugin)"
    print(f"1.1B LoRA r=16 all-linear, B=4 x T=2048, bf16, AdamW; compiled for {target}\n")
    print("| remat | attention | peak GB | TFLOP/step |")
    print("|---|---|---:|---:|")
    for policy in args.policies:
        for attention in args.attention:
            step, inputs = lora_step(
                mesh, remat=policy, attention_impl=attention, layers=args.layers
            )
            compiled = compile_on(mesh, step, *inputs, donate_argnums=(0,))
            flops = jaxpr_flops(step, *inputs, platform="cuda")
            peak = peak_bytes(compiled) / 1e9
            print(f"| {policy} | {attention} | {peak:.2f} | {flops / 1e12:.1f} |", flush=True)
    print(f"\n    JAX_PLATFORMS=cpu python {shlex.join(sys.argv)}")


if __name__ == "__main__":
    main()
