"""The fused 4-bit Pallas kernels (interpret mode on CPU) against XLA's dequantize-then-dot."""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jpeft import quant
from jpeft.quant import kernels

VARIANTS = [("nf4", True), ("nf4", False), ("fp4", True), ("fp4", False)]


def _weight(k: int, n: int, quant_type: str, double_quant: bool, blocksize: int = 64):
    w = jax.random.normal(jax.random.key(k + n), (k, n)) * jnp.linspace(0.1, 3.0, n)
    return quant.quantize(w, quant_type, blocksize, double_quant)


def _value_and_grad(x, w4, implementation):
    """``x @ W`` and the gradient of ``sum(y * c)`` w.r.t. ``x`` with ``implementation``."""
    c = jax.random.normal(jax.random.key(7), (x.shape[0], w4.out_features))
    w4 = quant.with_implementation(w4, implementation)

    def loss(x, w4):
        y = kernels.matmul(x, w4)
        return jnp.sum(y.astype(jnp.float32) * c), y

    (_, y), dx = jax.jit(jax.value_and_grad(loss, has_aux=True))(x, w4)
    return np.asarray(y, np.float32), np.asarray(dx, np.float32)


def _close(a, b, rtol):
    scale = np.abs(b).max()
    assert np.abs(a - b).max() <= rtol * scale, (np.abs(a - b).max(), scale)


# Every variant through the decode (M=1) and GEMM (M=100) kernels; more odd M with NF4+DQ.
CASES = [(m, *v) for m in (1, 100) for v in VARIANTS] + [(3, "nf4", True), (17, "nf4", True)]


@pytest.mark.parametrize(("m", "quant_type", "double_quant"), CASES)
def test_kernels_match_xla_values_and_input_grads(m, quant_type, double_quant):
    w4 = _weight(128, 48, quant_type, double_quant)
    x = jax.random.normal(jax.random.key(m), (m, 128))
    y, dx = _value_and_grad(x, w4, "interpret")
    ref_y, ref_dx = _value_and_grad(x, w4, "xla")
    _close(y, ref_y, 1e-6)
    _close(dx, ref_dx, 1e-6)


@pytest.mark.parametrize(("blocksize", "k", "n"), [(32, 256, 96), (128, 256, 32), (256, 512, 16)])
def test_blocksizes_and_many_nested_blocks(blocksize, k, n):
    # blocksize 32 with 96 rows: 768 absmax codes, three nested (double-quantization) blocks;
    # blocksizes above the 64-wide tiles: several tiles share one scale.
    w4 = _weight(k, n, "nf4", True, blocksize)
    for m in (5, 80):
        x = jax.random.normal(jax.random.key(m), (m, k))
        y, dx = _value_and_grad(x, w4, "interpret")
        ref_y, ref_dx = _value_and_grad(x, w4, "xla")
        _close(y, ref_y, 1e-6)
        _close(dx, ref_dx, 1e-6)


def test_bf16_inputs():
    w4 = _weight(128, 64, "nf4", True)
    x = jax.random.normal(jax.random.key(0), (20, 128)).astype(jnp.bfloat16)
    y, dx = _value_and_grad(x, w4, "interpret")
    ref_y, ref_dx = _value_and_grad(x, w4, "xla")
    _close(y, ref_y, 1e-2)  # bf16 outputs: one rounding of differently ordered fp32 sums
    _close(dx, ref_dx, 1e-2)


@pytest.mark.parametrize(("quant_type", "double_quant"), VARIANTS)
def test_under_a_rematerialised_scan(quant_type, double_quant):
    """A layer-stacked weight sliced by ``scan``, the layer body under ``checkpoint``."""
    w = jax.random.normal(jax.random.key(0), (2, 64, 64)) / 8
    w4 = quant.quantize(w, quant_type, 64, double_quant)
    x = jax.random.normal(jax.random.key(1), (5, 64))

    def loss(x, w4):
        layer = jax.checkpoint(lambda h, w_l: (jnp.tanh(kernels.matmul(h, w_l)), None))
        return jnp.sum(jax.lax.scan(layer, x, w4)[0] ** 2)

    step = jax.jit(jax.value_and_grad(loss))  # one jit: the implementation is in the treedef
    results = {i: step(x, quant.with_implementation(w4, i)) for i in ("interpret", "xla")}
    _close(np.asarray(results["interpret"][0]), np.asarray(results["xla"][0]), 1e-6)
    _close(np.asarray(results["interpret"][1]), np.asarray(results["xla"][1]), 1e-5)


def test_auto_picks_the_kernels_only_for_cuda():
    w4 = _weight(128, 48, "nf4", True)
    x = jnp.ones((3, 128), jnp.bfloat16)
    jaxpr = str(jax.make_jaxpr(lambda x: kernels.matmul(x, w4))(x))
    assert "platform_index" in jaxpr and "nf4_decode" in jaxpr
    cpu_program = jax.jit(lambda x: kernels.matmul(x, w4)).lower(x).as_text()
    assert "triton" not in cpu_program and "nf4_decode" not in cpu_program
    grad_jaxpr = str(jax.make_jaxpr(jax.grad(lambda x: kernels.matmul(x, w4).sum()))(x))
    assert "nf4_input_grad" in grad_jaxpr


def test_weights_the_kernels_do_not_take_use_xla():
    x = jnp.ones((3, 72))
    flat = quant.quantize(jnp.ones((72, 32)), "nf4", 64)  # flat layout
    odd_n = _weight(128, 24, "nf4", True)  # out_features not a multiple of 16
    assert not kernels.kernels_take(flat, x.dtype)
    assert not kernels.kernels_take(odd_n, x.dtype)
    assert not kernels.kernels_take(_weight(128, 48, "nf4", True), jnp.int32)
    flat = quant.with_implementation(flat, "interpret")
    jaxpr = str(jax.make_jaxpr(lambda x: kernels.matmul(x, flat))(x))
    assert "pallas_call" not in jaxpr
    with pytest.raises(ValueError, match="implementation must be one of"):
        quant.with_implementation(flat, "triton")


def test_bench_smoke_shows_no_weight_buffers_with_the_kernels():
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run(
        [sys.executable, os.path.join(root, "bench", "nf4_kernels.py"), "--smoke"],
        env=dict(os.environ, JAX_PLATFORMS="cpu"),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    cells = [line.strip("| ").split(" | ") for line in proc.stdout.splitlines()]
    # (variant, mesh, 4-bit matmul) -> weight-shaped buffers
    rows = {tuple(c[:3]): c[3] for c in cells if len(c) == 7 and c[0] == "nf4+DQ"}
    for mesh in ("1 device", "fsdp=2"):
        assert rows[("nf4+DQ", mesh, "interpret")] == "0", proc.stdout
        assert int(rows[("nf4+DQ", mesh, "xla")]) > 0, proc.stdout
