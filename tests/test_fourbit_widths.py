"""NF4/FP4 at any width: widths that are not a multiple of the blocksize, bit-exact with bnb.

bitsandbytes cuts blocks from the flattened torch weight, so its blocks cross row ends
whenever ``in_features % blocksize != 0`` (hidden size 72; an intermediate size of 8640
with blocksize 128). jpeft keeps such weights in bitsandbytes' flat layout.
"""

import bitsandbytes.functional as bnbf
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from conftest import bnb_4bit_model, hf_twin, sgd_train, tiny_config
from safetensors.numpy import load_file
from test_fourbit import _bnb_dequant, _data, _eager_bnb, _same_bits  # noqa: F401 (fixture)

import jpeft
from jpeft import quant
from jpeft.models import hf, llama
from jpeft.models.hf_names import PROJECTIONS, group_of
from jpeft.sharding import logical_axes


def _layers(w4: quant.QuantizedWeight, name: str) -> np.ndarray:
    """A field of ``w4`` as bitsandbytes' flat arrays, one row per layer (any layout)."""
    value = np.asarray(getattr(w4, name))
    return value.reshape(value.shape[0], -1) if value.ndim > 1 else value


def _check_layer_bits(w4: quant.QuantizedWeight, i: int, packed, state) -> None:
    """Layer ``i`` of ``w4`` holds the bits of bitsandbytes' ``(packed, state)``."""
    _same_bits(_layers(w4, "packed")[i], np.asarray(packed).reshape(-1))
    if w4.double_quant:
        _same_bits(_layers(w4, "quantized_absmax")[i], np.asarray(state.absmax))
        _same_bits(_layers(w4, "nested_absmax")[i], np.asarray(state.state2.absmax))
        _same_bits(np.asarray(w4.nested_offset)[i], np.asarray(state.offset))
    else:
        _same_bits(_layers(w4, "absmax")[i], np.asarray(state.absmax))


@pytest.mark.parametrize(
    ("quant_type", "double_quant"), [("nf4", True), ("nf4", False), ("fp4", False)]
)
@pytest.mark.parametrize("blocksize", [64, 128])
@pytest.mark.parametrize("width", [72, 200, 8640])
def test_any_width_matches_bnb(width, blocksize, quant_type, double_quant):
    jx, _ = _data((2, width, 12), "float32", seed=width + blocksize)
    w4 = quant.quantize(jx, quant_type, blocksize, double_quant)
    assert w4.layout == ("kernel" if width % blocksize == 0 else "flat")
    out = quant.dequantize(w4, jnp.float32)
    assert out.shape == jx.shape
    for i in range(2):
        weight = torch.from_numpy(np.array(jx[i].T))
        ref, state = bnbf.quantize_4bit(
            weight, blocksize=blocksize, quant_type=quant_type, compress_statistics=double_quant
        )
        _check_layer_bits(w4, i, ref, state)
        expected = _bnb_dequant(ref, state, tuple(weight.shape))
        _same_bits(np.asarray(out[i]).T.copy(), expected, signed_zeros=False)


def test_odd_element_count_and_bf16_output():
    jx, tx = _data((33, 5), "bfloat16", seed=5)  # 165 values: a half-filled last byte
    w4 = quant.quantize(jx, "nf4", 64, double_quant=False)
    ref, state = bnbf.quantize_4bit(tx.T.contiguous(), blocksize=64, quant_type="nf4")
    assert w4.packed.shape == (83,)
    _same_bits(w4.packed, ref.numpy()[:, 0])
    out = quant.dequantize(w4, jnp.bfloat16)
    _same_bits(np.asarray(out).T.copy(), _bnb_dequant(ref, state, (5, 33)), signed_zeros=False)


def test_flat_layout_shards_only_the_layer_axis():
    w4 = quant.quantize(jnp.ones((2, 72, 16)), "nf4", 64, double_quant=True)
    axes = w4.logical_axes(("layers", "embed", "heads"))
    assert (axes.packed, axes.quantized_absmax, axes.absmax) == (
        ("layers", None),
        ("layers", None),
        None,
    )
    aligned = quant.quantize(jnp.ones((2, 128, 16)), "nf4", 64, double_quant=False)
    axes = aligned.logical_axes(("layers", "embed", "heads"))
    assert (axes.packed, axes.absmax) == (("layers", "heads", "embed"), ("layers", "heads", None))
    tree = logical_axes({"layers": {"self_attn": {"q_proj": {"kernel": w4}}}})
    assert tree["layers"]["self_attn"]["q_proj"]["kernel"].nested_offset == ("layers",)


def test_bad_flat_shapes_raise():
    with pytest.raises(ValueError, match=r"needs packed \[\.\.\., 108\] and absmax \[\.\.\., 4\]"):
        quant.dequantize_flat(jnp.zeros(100, jnp.uint8), jnp.ones(4), (72, 3), "nf4", 64)
    with pytest.raises(ValueError, match=r"w: torch shape \(3, 72\) .* got packed \[100, 1\]"):
        quant.layout.bnb_to_layout("w", np.zeros((100, 1), np.uint8), np.ones(4), (3, 72), 64)


# One model whose linears take widths 72 (q/k/v/gate/up: in = hidden), 200 (o_proj:
# in = heads * head_dim) and 8640 (down_proj: in = intermediate).
WIDTHS = {"hidden_size": 72, "num_attention_heads": 4, "head_dim": 50, "intermediate_size": 8640}


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    cfg = tiny_config(**WIDTHS)
    path = tmp_path_factory.mktemp("widths")
    hf_twin(llama.init_params(jax.random.key(1), cfg), cfg).save_pretrained(path)
    return cfg, path


def _quantizer(blocksize: int):
    if blocksize == 64:
        return "nf4"  # the registered QLoRA quantizer: NF4, double quantization, blocksize 64
    return lambda kernel, module: quant.quantize(kernel, "nf4", blocksize, double_quant=True)


@pytest.mark.parametrize("blocksize", [64, 128])
def test_checkpoint_and_quantize_on_load_equal_bnb_bits(base, tmp_path, blocksize):
    cfg, path = base
    bnb_4bit_model(path, blocksize=blocksize).save_pretrained(tmp_path)
    _, loaded = hf.load_pretrained(tmp_path)
    _, ours = hf.load_pretrained(path, quantize=_quantizer(blocksize))
    assert jax.tree.structure(loaded) == jax.tree.structure(ours)
    for x, y in zip(jax.tree.leaves(loaded), jax.tree.leaves(ours), strict=True):
        _same_bits(x, y)
    files = load_file(tmp_path / "model.safetensors")
    for module in PROJECTIONS:
        group = group_of(module)
        w4 = loaded["layers"][group][module]["kernel"]
        assert w4.layout == ("kernel" if w4.in_features % blocksize == 0 else "flat")
        for i in range(cfg.num_hidden_layers):
            key = f"model.layers.{i}.{group}.{module}.weight"
            _same_bits(_layers(w4, "packed")[i], files[key][:, 0])
            _same_bits(_layers(w4, "quantized_absmax")[i], files[f"{key}.absmax"])
            _same_bits(_layers(w4, "nested_absmax")[i], files[f"{key}.nested_absmax"])


def test_logits_equal_transformers_bitsandbytes_at_hidden_72(base):
    cfg, path = base
    ids = np.random.RandomState(0).randint(0, cfg.vocab_size, (2, 9))
    with torch.no_grad():
        ref = bnb_4bit_model(path)(torch.tensor(ids)).logits.numpy()
    _, params = hf.load_pretrained(path, quantize="nf4")
    assert params["layers"]["self_attn"]["q_proj"]["kernel"].layout == "flat"
    out = np.asarray(llama.forward(params, cfg, jnp.asarray(ids)))
    assert np.abs(out - ref).max() / np.abs(ref).max() < 1e-5
    adapted = jpeft.QLoRA(r=4, targets=("q_proj", "o_proj")).init(jax.random.key(2), params, cfg)
    trained, losses = sgd_train(adapted, cfg, jnp.asarray(ids), steps=2)
    assert losses[-1] < losses[0]
    before = params["layers"]["self_attn"]["o_proj"]["kernel"].packed
    _same_bits(trained["layers"]["self_attn"]["o_proj"]["kernel"].base.packed, before)
