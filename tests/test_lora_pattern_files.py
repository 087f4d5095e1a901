"""rank_pattern / alpha_pattern keys peft saves but that match no module.

peft 0.21 only warns about such keys (``inject_adapter``) and saves them; its
``get_pattern_key`` (``re.match(rf"(.*\\.)?({key})$", name)``) leaves the modules at
``r`` / ``lora_alpha``. A file peft wrote loads here with a warning naming the keys
and peft's logits; a config written for jpeft directly still refuses them.
"""

import warnings

import jax
import peft
import pytest
from conftest import hf_twin
from test_lora import forward
from test_lora_peft import assert_close, peft_logits, randomize_peft

import jpeft

CASES = {
    "unknown_module": ({"foo_proj": 2}, {}, "rank_pattern keys \\['foo_proj'\\]"),
    "anchored": ({"^q_proj": 2, "v_proj": 3}, {"^v_proj": 5}, "\\['\\^q_proj'\\]"),
    "untargeted": ({"k_proj": 2}, {"up_proj": 4}, "alpha_pattern keys \\['up_proj'\\]"),
}


@pytest.mark.parametrize("case", CASES)
def test_peft_file_with_dead_pattern_keys_loads_with_a_warning(params, cfg, batch, tmp_path, case):
    rank_pattern, alpha_pattern, match = CASES[case]
    ids, mask = batch
    config = peft.LoraConfig(
        r=8,
        lora_alpha=16,
        target_modules=["q_proj", "v_proj"],
        rank_pattern=rank_pattern,
        alpha_pattern=alpha_pattern,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # peft's own warning about the keys
        model = peft.get_peft_model(hf_twin(params, cfg), config)
    randomize_peft(model)
    model.eval().save_pretrained(tmp_path)
    with pytest.warns(UserWarning, match=match):
        method, loaded = jpeft.load_hf_adapter(tmp_path, params, cfg)
    live = {k: v for k, v in rank_pattern.items() if k == "v_proj"}
    assert dict(method.rank_pattern) == live and not method.alpha_pattern
    assert_close(
        forward(loaded, cfg, ids, attention_mask=mask), peft_logits(model, ids, mask), mask
    )
    reloaded = peft.PeftModel.from_pretrained(hf_twin(params, cfg), tmp_path).eval()
    assert_close(
        forward(loaded, cfg, ids, attention_mask=mask), peft_logits(reloaded, ids, mask), mask
    )


@pytest.mark.parametrize("pattern", [{"foo_proj": 2}, {"^q_proj": 2}])
def test_dead_pattern_keys_in_a_jpeft_config_are_refused(params, cfg, pattern):
    with pytest.raises(ValueError, match="match no module"):
        jpeft.LoRA(targets=("q_proj",), rank_pattern=pattern).init(jax.random.key(0), params, cfg)


def test_peft_and_jpeft_pick_the_same_rank(params, cfg, tmp_path):
    """The first matching key wins, in both (a key listed before a more specific one)."""
    pattern = {"q_proj": 2, r"layers\.1\.self_attn\.q_proj": 3}
    model = peft.get_peft_model(
        hf_twin(params, cfg), peft.LoraConfig(r=8, target_modules=["q_proj"], rank_pattern=pattern)
    )
    ranks = [model.base_model.model.model.layers[i].self_attn.q_proj.r["default"] for i in (0, 1)]
    plan = jpeft.LoRA(targets=("q_proj",), rank_pattern=pattern).plans(cfg)["q_proj"]
    assert list(plan.ranks) == ranks
