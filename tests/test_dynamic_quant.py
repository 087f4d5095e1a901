"""Bit-exact parity of jpeft.quant.dynamic with bitsandbytes' CPU backend."""

import bitsandbytes.functional as bnbf
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from jpeft.quant.dynamic import dequantize_blockwise, dynamic_map, quantize_blockwise

# Every documented blocksize; all but one case end in a partial block.
CASES = [
    ((7,), 64),
    ((3, 5, 7), 128),
    ((4, 256), 256),
    ((257,), 256),
    ((513, 3), 512),
    ((33, 65), 1024),
    ((4097,), 2048),
    ((3, 3001), 4096),
]


def _bnb_quantize(x: np.ndarray, code: np.ndarray, blocksize: int) -> tuple[np.ndarray, np.ndarray]:
    q, state = bnbf.quantize_blockwise(
        torch.from_numpy(x), code=torch.from_numpy(code), blocksize=blocksize
    )
    return q.numpy().reshape(-1), state.absmax.numpy()


def _heavy_tailed(rng: np.random.Generator, shape: tuple[int, ...], signed: bool) -> np.ndarray:
    x = rng.standard_normal(shape) * np.exp(rng.normal(0.0, 3.0, shape))
    return (x if signed else np.abs(x)).astype(np.float32)


def _assert_same_bits(a: np.ndarray, b: np.ndarray) -> None:
    assert a.dtype == b.dtype and a.shape == b.shape
    np.testing.assert_array_equal(a.view(np.uint8), b.view(np.uint8))


@pytest.mark.parametrize("signed", [True, False])
def test_dynamic_map_bit_identical(signed):
    ref = bnbf.create_dynamic_map(signed=signed).numpy()
    _assert_same_bits(dynamic_map(signed=signed), ref)


@pytest.mark.parametrize("signed", [True, False])
@pytest.mark.parametrize(("shape", "blocksize"), CASES)
def test_quantize_matches_bnb(signed, shape, blocksize):
    rng = np.random.default_rng(sum(shape) + blocksize + signed)
    code = dynamic_map(signed)
    x = _heavy_tailed(rng, shape, signed)
    flat = x.reshape(-1)
    flat[-5:] = 0.0  # exact zeros inside a nonzero block
    if flat.size > blocksize:
        flat[:blocksize] = 0.0  # an all-zero block
    ref_q, ref_absmax = _bnb_quantize(x, code, blocksize)
    q, absmax = quantize_blockwise(jnp.asarray(x), jnp.asarray(code), blocksize)
    _assert_same_bits(np.asarray(q), ref_q)
    _assert_same_bits(np.asarray(absmax), ref_absmax)

    ref_y = bnbf.dequantize_blockwise(
        torch.from_numpy(ref_q.reshape(shape)),
        absmax=torch.from_numpy(ref_absmax),
        code=torch.from_numpy(code),
        blocksize=blocksize,
    ).numpy()
    y = dequantize_blockwise(q, absmax, jnp.asarray(code), blocksize, shape)
    _assert_same_bits(np.asarray(y), ref_y)


@pytest.mark.parametrize("signed", [True, False])
def test_rounding_at_bin_and_code_boundaries(signed):
    """Values sitting on the 65536-bin edges and on codebook midpoints, +-6 ulp."""
    code = dynamic_map(signed)
    edges = ((np.arange(1, 65536) - 0.5) / 32767.5 - 1.0).astype(np.float32)
    midpoints = (np.float32(0.5) * (code[:-1] + code[1:])).astype(np.float32)
    vals = [np.concatenate([edges, midpoints, code])]
    for direction in (-2.0, 2.0):
        v = vals[0]
        for _ in range(6):
            v = np.nextafter(v, np.float32(direction))
            vals.append(v)
    v = np.clip(np.concatenate(vals), -1.0, 1.0)
    v = v if signed else np.abs(v)
    # Each block of 256 starts with 1.0, so absmax is 1 and the values are used as they are.
    body = np.resize(v, (-(-v.size // 255), 255))
    x = np.concatenate([np.ones((body.shape[0], 1), np.float32), body], axis=1).reshape(-1)
    ref_q, _ = _bnb_quantize(x, code, 256)
    q, _ = quantize_blockwise(jnp.asarray(x), jnp.asarray(code), 256)
    _assert_same_bits(np.asarray(q), ref_q)


@pytest.mark.parametrize(
    ("dtype", "torch_dtype"), [("bfloat16", "bfloat16"), ("float16", "float16")]
)
def test_half_precision_matches_bnb(dtype, torch_dtype):
    rng = np.random.default_rng(0)
    code = dynamic_map(True)
    x32 = rng.standard_normal((37, 29)).astype(np.float32)
    x = jnp.asarray(x32, dtype=dtype)
    tx = torch.from_numpy(x32).to(getattr(torch, torch_dtype))
    ref_q, state = bnbf.quantize_blockwise(tx, code=torch.from_numpy(code), blocksize=128)
    q, absmax = quantize_blockwise(x, jnp.asarray(code), 128)
    _assert_same_bits(np.asarray(q), ref_q.numpy().reshape(-1))
    _assert_same_bits(np.asarray(absmax), state.absmax.numpy())
    ref_y = bnbf.dequantize_blockwise(ref_q, state).float().numpy()
    y = dequantize_blockwise(q, absmax, jnp.asarray(code), 128, x.shape, dtype=x.dtype)
    assert y.dtype == x.dtype
    _assert_same_bits(np.asarray(y.astype(jnp.float32)), ref_y)


def test_jit_matches_eager():
    code = jnp.asarray(dynamic_map(False))
    x = jnp.abs(jax.random.normal(jax.random.key(0), (300, 7)))
    quant = jax.jit(quantize_blockwise, static_argnums=2)
    dequant = jax.jit(dequantize_blockwise, static_argnums=(3, 4, 5))
    q, absmax = quant(x, code, 256)
    q_eager, absmax_eager = quantize_blockwise(x, code, 256)
    np.testing.assert_array_equal(q, q_eager)
    np.testing.assert_array_equal(absmax, absmax_eager)
    np.testing.assert_array_equal(
        dequant(q, absmax, code, 256, x.shape, jnp.float32),
        dequantize_blockwise(q, absmax, code, 256, x.shape),
    )


def test_bad_inputs_raise():
    code = jnp.asarray(dynamic_map())
    x = jnp.ones((10,))
    with pytest.raises(ValueError, match="code"):
        quantize_blockwise(x, code[:255])
    with pytest.raises(ValueError, match="blocksize"):
        quantize_blockwise(x, code, 0)
    with pytest.raises(ValueError, match="x: expected"):
        quantize_blockwise(jnp.ones((10,), jnp.int32), code)
    q, absmax = quantize_blockwise(x, code, 4)
    with pytest.raises(ValueError, match="codes"):
        dequantize_blockwise(q, absmax, code, 4, (11,))
    with pytest.raises(ValueError, match="absmax"):
        dequantize_blockwise(q, absmax[:2], code, 4, (10,))
    with pytest.raises(ValueError, match="dtype"):
        dequantize_blockwise(q, absmax, code, 4, (10,), dtype=jnp.int8)
