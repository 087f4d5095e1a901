"""LoRA on embed_tokens and lm_head, modules_to_save and trainable tokens, both ways with peft.

Each case is a peft ``LoraConfig``; the same options given to ``jpeft.LoRA`` write
files peft loads, and files peft writes load here, with the same fp32 logits (1e-5
relative). Tied embeddings follow peft's default (``ensure_weight_tying=False``): a
LoRA on embed_tokens adapts the input only, trainable tokens reach the output too,
and merging folds the embedding LoRA into the one shared table, as peft's
``merge_and_unload`` does.
"""

import jax
import numpy as np
import peft
import pytest
import torch
from conftest import hf_twin, tiny_config
from test_lora import forward
from test_lora_peft import peft_logits

import jpeft
from jpeft.lora import LoRAWeight
from jpeft.lora.trainable import TrainableTokens
from jpeft.models import llama
from jpeft.models.hf_names import hf_state_dict

CASES = {
    "embed_tokens": {"target_modules": ["q_proj", "embed_tokens"]},
    "lm_head": {"target_modules": ["v_proj", "lm_head"], "lora_dropout": 0.1},
    "both_patterns": {
        "target_modules": ["q_proj", "embed_tokens", "lm_head"],
        "rank_pattern": {"embed_tokens": 2},
        "alpha_pattern": {"lm_head": 3},
    },
    "modules_to_save": {
        "target_modules": ["q_proj"],
        "modules_to_save": ["embed_tokens", "lm_head"],
    },
    "trainable_tokens": {"target_modules": ["q_proj"], "trainable_token_indices": [3, 5, 7]},
}
TIED_CASES = ("embed_tokens", "trainable_tokens")


def relative_error(out, ref, mask):
    valid = mask.astype(bool)
    return float(np.abs(np.asarray(out) - ref)[valid].max() / np.abs(ref[valid]).max())


def batch(cfg):
    """ids [2, 9] holding the trainable token ids, the second row right-padded."""
    rs = np.random.RandomState(0)
    ids = rs.randint(0, cfg.vocab_size, (2, 9)).astype(np.int32)
    ids[0, :3] = (3, 5, 7)
    mask = np.ones((2, 9), np.int32)
    mask[1, 6:] = 0
    return ids, mask


def jpeft_method(config: dict) -> jpeft.LoRA:
    return jpeft.LoRA(
        r=4,
        alpha=8,
        dropout=config.get("lora_dropout", 0.0),
        targets=tuple(sorted(config["target_modules"])),
        rank_pattern=config.get("rank_pattern", {}),
        alpha_pattern=config.get("alpha_pattern", {}),
        modules_to_save=tuple(config.get("modules_to_save", ())),
        trainable_token_indices=tuple(config.get("trainable_token_indices", ())),
    )


def perturb(params, seed=0):
    """Every trainable leaf moved by noise, so each part of the adapter shows in the logits."""
    trainable, frozen = jpeft.split(params)
    leaves, treedef = jax.tree.flatten(trainable)
    rs = np.random.RandomState(seed)
    leaves = [x + 0.1 * rs.randn(*x.shape).astype(np.float32) for x in leaves]
    return jpeft.combine(jax.tree.unflatten(treedef, leaves), frozen)


def perturb_peft(model, seed=0):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in model.named_parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn(p.shape, generator=gen))


def setups():
    return [(name, False) for name in CASES] + [(name, True) for name in TIED_CASES]


def ours_in_peft(name, params, cfg, hf_model, path, label):
    """Save case ``name`` from jpeft, load it in peft over ``hf_model``; the rel. error."""
    ids, mask = batch(cfg)
    method = jpeft_method(CASES[name])
    adapted = perturb(method.init(jax.random.key(1), params, cfg))
    jpeft.save_hf_adapter(path, method, adapted, cfg)
    model = peft.PeftModel.from_pretrained(hf_model, path).eval()
    ref = peft_logits(model, ids, mask)
    base = np.asarray(forward(params, cfg, ids, attention_mask=mask))
    assert relative_error(base, ref, mask) > 1e-3  # the adapter changes the logits
    err = relative_error(forward(adapted, cfg, ids, attention_mask=mask), ref, mask)
    print(f"jpeft -> peft {label}: {err:.2e}")
    return err


def peft_here(name, params, cfg, hf_model, path, label):
    """Save case ``name`` from peft over ``hf_model``, load it here: ``(rel. error, params)``."""
    ids, mask = batch(cfg)
    torch.manual_seed(0)
    model = peft.get_peft_model(hf_model, peft.LoraConfig(r=4, lora_alpha=8, **CASES[name]))
    perturb_peft(model)
    model.eval().save_pretrained(path)
    method, loaded = jpeft.load_hf_adapter(path, params, cfg)
    assert method == jpeft_method(CASES[name])
    out = forward(loaded, cfg, ids, attention_mask=mask)
    err = relative_error(out, peft_logits(model, ids, mask), mask)
    print(f"peft -> jpeft {label}: {err:.2e}")
    return err, loaded


@pytest.mark.parametrize("name, tied", setups())
def test_our_adapter_loads_in_peft(name, tied, tmp_path):
    cfg = tiny_config(tie_word_embeddings=tied)
    params = llama.init_params(jax.random.key(0), cfg)
    label = f"{name} tied={tied}"
    assert ours_in_peft(name, params, cfg, hf_twin(params, cfg), tmp_path, label) < 1e-5


@pytest.mark.parametrize("name, tied", setups())
def test_peft_adapter_loads_here(name, tied, tmp_path):
    cfg = tiny_config(tie_word_embeddings=tied)
    params = llama.init_params(jax.random.key(0), cfg)
    label = f"{name} tied={tied}"
    err, loaded = peft_here(name, params, cfg, hf_twin(params, cfg), tmp_path, label)
    assert err < 1e-5
    # merging gives peft's merged model (on a tied model: the one shared table)
    merged = peft.PeftModel.from_pretrained(hf_twin(params, cfg), tmp_path).merge_and_unload()
    ref = {k: v.detach().numpy() for k, v in merged.state_dict().items()}
    for key, value in hf_state_dict(jpeft.merge(loaded), cfg).items():
        np.testing.assert_allclose(value, ref[key], rtol=1e-5, atol=1e-6, err_msg=key)


def test_nodes_and_trainable_parts():
    cfg = tiny_config()
    params = llama.init_params(jax.random.key(0), cfg)
    method = jpeft_method(CASES["both_patterns"])
    adapted = method.init(jax.random.key(1), params, cfg)
    emb, head = adapted["embed_tokens"]["embedding"], adapted["lm_head"]["kernel"]
    assert isinstance(emb, LoRAWeight) and isinstance(head, LoRAWeight)
    ad = emb.adapters[0]
    # peft's Embedding init: A zero, B standard normal; rank 2 from the pattern
    assert ad.a.shape == (cfg.vocab_size, 2) and not np.asarray(ad.a).any()
    assert ad.b.shape == (2, cfg.hidden_size) and 0.5 < float(np.std(ad.b)) < 1.5
    assert float(head.adapters[0].scaling) == 3 / 4
    ids, mask = batch(cfg)
    np.testing.assert_array_equal(  # a no-op at init
        forward(adapted, cfg, ids, attention_mask=mask),
        forward(params, cfg, ids, attention_mask=mask),
    )
    tokens = jpeft_method(CASES["trainable_tokens"]).init(jax.random.key(1), params, cfg)
    node = tokens["embed_tokens"]["embedding"]
    assert isinstance(node, TrainableTokens) and node.delta.shape == (3, cfg.hidden_size)
    trainable, _ = jpeft.split(tokens)
    assert trainable["embed_tokens"]["embedding"].base is None


@pytest.mark.parametrize(
    "kwargs, tied, match",
    [
        ({"targets": ("lm_head",)}, True, "tied"),
        ({"modules_to_save": ("lm_head",)}, True, "tied embeddings"),
        ({"modules_to_save": ("q_proj",)}, False, r"modules_to_save \['q_proj'\]"),
        ({"targets": ("embed_tokens",), "trainable_token_indices": (1,)}, False, "both"),
        ({"trainable_token_indices": (97,)}, False, r"\[0, 97\)"),
        ({"targets": ("embed_tokens",), "use_dora": True}, False, "use_dora"),
    ],
)
def test_what_jpeft_cannot_match_is_refused(kwargs, tied, match):
    cfg = tiny_config(tie_word_embeddings=tied)
    params = llama.init_params(jax.random.key(0), cfg)
    with pytest.raises(ValueError, match=match):
        jpeft.LoRA(**kwargs).init(jax.random.key(1), params, cfg)
