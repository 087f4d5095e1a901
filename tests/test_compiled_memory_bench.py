"""bench/compiled_memory.py --smoke: the deviceless-compile benchmark's code runs on CPU."""

from __future__ import annotations

import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "bench"))

import compiled_memory  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from deviceless import jaxpr_flops  # noqa: E402

from jpeft.quant import quantize  # noqa: E402
from jpeft.quant.kernels import op  # noqa: E402


def test_smoke_rows_compile_and_print_the_table(capsys):
    rows = "7B/qlora/paged-adamw,1.1B/prefix"  # paged state; a method initialized on the host
    results = compiled_memory.main(["--smoke", "--rows", rows])
    assert [(r["config"], r["method"], r["optimizer"]) for r in results] == [
        ("1.1B", "prefix", "adamw"),
        ("7B", "qlora", "paged-adamw"),
    ]
    for r in results:
        assert r["peak"] > 0 and r["flops"] > 0 and r["trainable"] > 0
    out = capsys.readouterr().out
    assert "| 7B | qlora | paged-adamw |" in out
    assert "python " in out and "--smoke" in out  # the command that produced the table


def test_flops_count_the_nf4_kernels_a_gpu_runs():
    """The CUDA branch of a 4-bit matmul is a Pallas kernel under custom_partitioning."""
    w = quantize(jnp.ones((256, 128)), "nf4", 64, True)
    x = jnp.ones((32, 256), jnp.bfloat16)
    assert jaxpr_flops(lambda x: op.matmul(x, w), x, platform="cuda") == 2 * 32 * 256 * 128
