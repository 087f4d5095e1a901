"""Bit-exact parity of jpeft.quant 4-bit (NF4/FP4) and double quantization with bitsandbytes."""

import copy

import bitsandbytes.functional as bnbf
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from jpeft.quant import (
    FP4_TABLE,
    NF4_TABLE,
    bits_per_param,
    check_blocksize,
    dequantize_4bit,
    dequantize_kernel,
    double_dequantize,
    double_quantize,
    flat_to_kernel,
    kernel_to_flat,
    quantize_4bit,
    quantize_kernel,
    quantized_nbytes,
    torch_mean,
    torch_sum,
)


@pytest.fixture(autouse=True)
def _eager_bnb():
    """bitsandbytes torch.compiles its fallback dequantize per shape (a minute each on CPU).

    Its eager run computes the same fp32 products; keep the tests fast with it. torch's own
    ``config.patch`` restores the setting (pytest's monkeypatch undoes it with ``delattr``,
    which torch's config module takes as hiding the key from every later test).
    """
    with torch._dynamo.config.patch(disable=True):
        yield


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# (shape, blocksize): partial last blocks, odd sizes, blocks spanning rows, 1-D and 3-D.
CASES = [
    ((7,), 64),
    ((3, 5), 32),
    ((100, 33), 64),
    ((17, 64), 32),
    ((5, 300), 128),
    ((2, 3, 128), 256),
    ((1000,), 512),
    ((40, 130), 1024),
    ((9000,), 2048),
    ((3, 3000), 4096),
]


def _data(shape: tuple[int, ...], dtype: str, seed: int) -> tuple[jax.Array, "torch.Tensor"]:
    """Heavy-tailed values with exact zeros (and an all-zero stretch), as JAX and torch."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(shape) * np.exp(rng.normal(0.0, 1.0, shape))
    x.reshape(-1)[::7] = 0.0
    if x.size >= 200:
        x.reshape(-1)[:40] = 0.0
    jx = jnp.asarray(x.astype(np.float32)).astype(dtype)
    tx = torch.from_numpy(np.array(jx.astype(jnp.float32))).to(DTYPES[dtype])
    return jx, tx


def _same_bits(a, b, signed_zeros: bool = True) -> None:
    a, b = np.atleast_1d(np.asarray(a)), np.atleast_1d(np.asarray(b))
    if not signed_zeros:
        a, b = np.where(a == 0, np.zeros_like(a), a), np.where(b == 0, np.zeros_like(b), b)
    assert a.shape == b.shape and a.dtype == b.dtype, (a.shape, a.dtype, b.shape, b.dtype)
    np.testing.assert_array_equal(a.view(np.uint8), b.view(np.uint8))


def _torch_to_np(t: "torch.Tensor") -> np.ndarray:
    return np.asarray(jnp.asarray(t.float().numpy()).astype(str(t.dtype).split(".")[-1]))


def _bnb_dequant(packed, state, shape) -> np.ndarray:
    """bitsandbytes' dequantization of the flattened tensor, reshaped to ``shape``.

    Blocks run over the flattened tensor (as in its CUDA kernels). Given an N-d shape whose
    last dimension is shorter than a block, bitsandbytes 0.50's CPU path restarts blocks
    at every row and decodes wrongly, so the reference is asked for the flat tensor.
    """
    flat = copy.copy(state)
    flat.shape = torch.Size([int(np.prod(shape))])
    return _torch_to_np(bnbf.dequantize_4bit(packed, flat)).reshape(shape)


def _same_dequant(out, packed, state, shape) -> None:
    # FP4 code 8 is -0.0 in the table; bitsandbytes' CPU paths decode it as +0.0 (its Python
    # fallback, and every shape since 0.50), its CUDA kernel as -0.0, as jpeft does. The two
    # zeros are equal values, so they compare equal here; every other bit must match.
    _same_bits(out, _bnb_dequant(packed, state, shape), signed_zeros=False)


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_tables_match_bnb(quant_type):
    table = NF4_TABLE if quant_type == "nf4" else FP4_TABLE
    _same_bits(table, bnbf.get_4bit_type(quant_type, device="cpu").numpy())


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize(("shape", "blocksize"), CASES)
def test_quantize_matches_bnb(shape, blocksize, quant_type, dtype):
    jx, tx = _data(shape, dtype, seed=blocksize + len(shape))
    ref_packed, state = bnbf.quantize_4bit(tx, blocksize=blocksize, quant_type=quant_type)
    packed, absmax = quantize_4bit(jx, quant_type, blocksize)
    _same_bits(packed, ref_packed.numpy())
    _same_bits(absmax, state.absmax.numpy())
    out = dequantize_4bit(packed, absmax, shape, quant_type, blocksize, jx.dtype)
    _same_dequant(out, ref_packed, state, shape)


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize(("shape", "blocksize"), [*CASES[:6], ((300, 257), 32), ((64, 1000), 64)])
def test_double_quant_matches_bnb(shape, blocksize, quant_type):
    jx, tx = _data(shape, "float32", seed=3 * blocksize + len(shape))
    ref_packed, state = bnbf.quantize_4bit(
        tx, blocksize=blocksize, quant_type=quant_type, compress_statistics=True
    )
    packed, absmax = quantize_4bit(jx, quant_type, blocksize)
    codes, offset, nested = double_quantize(absmax)
    _same_bits(packed, ref_packed.numpy())
    _same_bits(codes, state.absmax.numpy())
    _same_bits(offset, state.offset.numpy())
    _same_bits(nested, state.state2.absmax.numpy())
    restored = double_dequantize(codes, offset, nested)
    ref_restored = bnbf.dequantize_blockwise(state.absmax, state.state2) + state.offset
    _same_bits(restored, ref_restored.numpy())
    out = dequantize_4bit(packed, restored, shape, quant_type, blocksize)
    _same_dequant(out, ref_packed, state, shape)


def test_ties_go_to_the_lower_code():
    # absmax 1: each value is its own scaled value; exact midpoints round down.
    sorted_codes = np.sort(NF4_TABLE)
    mids = ((sorted_codes[:-1] + sorted_codes[1:]) / np.float32(2)).astype(np.float32)
    x = np.concatenate([[1.0], mids, np.nextafter(mids, np.float32(2))]).astype(np.float32)
    packed, _ = quantize_4bit(jnp.asarray(x), "nf4", 32)
    ref, _ = bnbf.quantize_4bit(torch.from_numpy(x), blocksize=32, quant_type="nf4")
    _same_bits(packed, ref.numpy())
    nibbles = np.stack([np.asarray(packed)[:, 0] >> 4, np.asarray(packed)[:, 0] & 0xF], 1)
    nibbles = nibbles.reshape(-1)
    np.testing.assert_array_equal(nibbles[1:16], np.arange(15))  # midpoint k -> code k
    np.testing.assert_array_equal(nibbles[16:31], np.arange(1, 16))  # just above -> k + 1


def test_partial_block_divides_full_blocks_multiply():
    # x / absmax lands exactly on the first NF4 midpoint, x * (1 / absmax) one ulp above it:
    # a full block (reciprocal) and the partial block (division) give different codes.
    absmax, x = np.float32(3.3464457988739014), np.float32(-2.838108539581299)
    block = np.zeros(32, np.float32)
    block[:2] = absmax, x
    data = np.concatenate([block, block[:16]])
    packed, _ = quantize_4bit(jnp.asarray(data), "nf4", 32)
    ref, _ = bnbf.quantize_4bit(torch.from_numpy(data), blocksize=32, quant_type="nf4")
    _same_bits(packed, ref.numpy())
    full_code, partial_code = np.asarray(packed)[0, 0] & 0xF, np.asarray(packed)[16, 0] & 0xF
    assert (full_code, partial_code) == (1, 0)


def test_zero_blocks_and_fp4_zero_codes():
    data = np.zeros(64 + 10, np.float32)  # a full and a partial all-zero block
    data[64:66] = 1e-5, -1e-5  # tiny values next to a large one in the partial block
    data[66] = 1.0
    for quant_type, zero_code in [("nf4", 7), ("fp4", 0)]:
        packed, absmax = quantize_4bit(jnp.asarray(data), quant_type, 64)
        ref, state = bnbf.quantize_4bit(torch.from_numpy(data), blocksize=64, quant_type=quant_type)
        _same_bits(packed, ref.numpy())
        _same_bits(absmax, state.absmax.numpy())
        assert np.all(np.asarray(packed)[:32] == zero_code * 17)
        assert np.asarray(absmax)[0] == 0.0 and np.asarray(absmax)[1] == 1.0
    # FP4: +tiny -> code 8 (bnb's table has +0.0 there), -tiny -> code 0.
    assert np.asarray(packed)[32, 0] == 0x80
    # An all-zero partial block stores the clamp 1e-38 (a subnormal) as its absmax.
    _, absmax = quantize_4bit(jnp.zeros(70), "nf4", 64)
    _same_bits(absmax, np.array([0.0, 1e-38], np.float32))


@pytest.mark.parametrize("n", [1, 5, 8, 31, 33, 127, 600, 4097, 70001])
def test_torch_sum_and_mean_match_torch_serial(n):
    rng = np.random.default_rng(n)
    x = (rng.random(n) * np.exp(rng.normal(0, 2, n))).astype(np.float32)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # torch splits reductions of >= 32768 values across threads
    try:
        ref_sum, ref_mean = torch.from_numpy(x).sum(), torch.from_numpy(x).mean()
    finally:
        torch.set_num_threads(threads)
    _same_bits(torch_sum(jnp.asarray(x)), ref_sum.numpy())
    _same_bits(torch_mean(jnp.asarray(x)), ref_mean.numpy())


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize(("shape", "blocksize"), [((2, 128, 24), 64), ((256, 5), 32)])
def test_kernel_layout_equals_bnb_flat(shape, blocksize, quant_type):
    jx, _ = _data(shape, "bfloat16", seed=11)
    packed, absmax = quantize_kernel(jx, quant_type, blocksize)
    d_in, d_out = shape[-2:]
    lead = shape[:-2]
    assert packed.shape == (*lead, d_out, d_in // 2)
    assert absmax.shape == (*lead, d_out, d_in // blocksize)
    flat_packed, flat_absmax = kernel_to_flat(packed, absmax)
    back = flat_to_kernel(flat_packed, flat_absmax, (d_out, d_in), blocksize)
    _same_bits(back[0], packed)
    _same_bits(back[1], absmax)
    codes, offset, nested = double_quantize(absmax, batch_ndim=len(lead))
    restored = double_dequantize(codes, offset, nested, batch_ndim=len(lead))
    kernel = dequantize_kernel(packed, absmax, quant_type, blocksize, jnp.bfloat16)
    assert kernel.shape == shape and kernel.dtype == jnp.bfloat16
    kernel_dq = dequantize_kernel(packed, restored, quant_type, blocksize, jnp.bfloat16)
    flat_codes = kernel_to_flat(packed, codes)[1]
    layers = [jx] if not lead else list(jx)
    for i, layer in enumerate(layers):
        idx = (i,) if lead else ()
        weight = torch.from_numpy(np.array(layer.T.astype(jnp.float32))).to(torch.bfloat16)
        ref, state = bnbf.quantize_4bit(
            weight, blocksize=blocksize, quant_type=quant_type, compress_statistics=True
        )
        ref_plain, plain = bnbf.quantize_4bit(weight, blocksize=blocksize, quant_type=quant_type)
        _same_bits(flat_packed[idx], ref.numpy())
        _same_bits(flat_absmax[idx], plain.absmax.numpy())
        _same_bits(flat_codes[idx], state.absmax.numpy())
        _same_bits(offset[idx], state.offset.numpy())
        _same_bits(nested[idx], state.state2.absmax.numpy())
        _same_dequant(kernel[idx].T, ref_plain, plain, weight.shape)
        _same_dequant(kernel_dq[idx].T, ref, state, weight.shape)


def test_kernel_layout_under_jit():
    kernel = jax.random.normal(jax.random.key(0), (3, 64, 16), jnp.float32)

    @jax.jit
    def roundtrip(w):
        packed, absmax = quantize_kernel(w, "nf4", 64)
        return dequantize_kernel(packed, absmax, "nf4", 64, jnp.float32)

    out = roundtrip(kernel)
    assert out.shape == kernel.shape
    assert float(jnp.max(jnp.abs(out - kernel) / jnp.max(jnp.abs(kernel)))) < 0.2


@pytest.mark.parametrize("blocksize", [16, 48, 8192, 0, True, 64.0])
def test_bad_blocksize_raises(blocksize):
    with pytest.raises(ValueError, match="blocksize must be one of"):
        quantize_4bit(jnp.ones(64), "nf4", blocksize)
    with pytest.raises(ValueError, match="blocksize must be one of"):
        check_blocksize(blocksize)


def test_bad_inputs_raise():
    with pytest.raises(ValueError, match="quant_type must be one of"):
        quantize_4bit(jnp.ones(64), "int4", 64)
    with pytest.raises(ValueError, match=r"x\.dtype must be float32, bfloat16 or float16"):
        quantize_4bit(jnp.ones(64, jnp.int32), "nf4", 64)
    with pytest.raises(ValueError, match="empty"):
        quantize_4bit(jnp.ones((0, 4)), "nf4", 64)
    with pytest.raises(ValueError, match=r"kernel shape \(100, 8\) has in_features=100"):
        quantize_kernel(jnp.ones((100, 8)), "nf4", 64)
    with pytest.raises(ValueError, match=r"\(2, 96, 8\) has in_features=96 and blocksize=64"):
        quantize_kernel(jnp.ones((2, 96, 8)), "nf4", 64)
    packed, absmax = quantize_4bit(jnp.ones(100), "nf4", 64)
    with pytest.raises(ValueError, match="needs 51 packed bytes"):
        dequantize_4bit(packed, absmax, (101,), "nf4", 64)
    with pytest.raises(ValueError, match="needs absmax of shape"):
        dequantize_kernel(jnp.zeros((4, 32), jnp.uint8), jnp.ones((4, 2)), "nf4", 64)
    with pytest.raises(ValueError, match="need offset of shape"):
        double_dequantize(jnp.zeros(300, jnp.uint8), jnp.zeros(()), jnp.ones(1))
    with pytest.raises(ValueError, match="absmax must be float32"):
        double_quantize(jnp.ones(10, jnp.bfloat16))


def test_bits_per_param_and_nbytes():
    assert round(bits_per_param(64, double_quant=True), 3) == 4.127
    assert bits_per_param(64, double_quant=False) == 4.5
    assert bits_per_param(128, double_quant=False) == 4.25
    shape = (96, 300)  # 28800 values: 450 blocks of 64, 2 nested blocks (one partial)
    packed, absmax = quantize_4bit(jnp.ones(shape), "nf4", 64)
    codes, offset, nested = double_quantize(absmax)
    assert quantized_nbytes(shape, 64, double_quant=False) == packed.nbytes + absmax.nbytes
    stored = packed.nbytes + codes.nbytes + offset.nbytes + nested.nbytes
    assert quantized_nbytes(shape, 64, double_quant=True) == stored
    big = quantized_nbytes((4096, 4096), 64, double_quant=True) * 8 / 4096**2
    assert abs(big - bits_per_param(64, double_quant=True)) < 1e-5
