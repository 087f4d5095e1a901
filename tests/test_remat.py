"""Remat policies keep what they name: the projection outputs, and nothing else per layer;
the offloading ones keep them, and each layer's input, in host memory."""

import jax
import jax.numpy as jnp
import pytest
from conftest import tiny_config
from jax.ad_checkpoint import print_saved_residuals

from jpeft.models import llama
from jpeft.train.config import RunConfig


def _layer_residuals(capsys, remat: str) -> list[str]:
    """Shapes of the values the layer scan keeps for the backward pass."""
    cfg = tiny_config()
    params = llama.init_params(jax.random.key(0), cfg)
    ids = jnp.zeros((2, 9), jnp.int32)
    capsys.readouterr()
    print_saved_residuals(lambda p: jnp.sum(llama.forward(p, cfg, ids, remat=remat)), params)
    lines = capsys.readouterr().out.splitlines()
    return sorted(line.split()[0] for line in lines if "output of scan" in line)


@pytest.mark.parametrize("policy, memory", [("proj", ""), ("proj_offload", "<host>")])
def test_proj_policy_saves_the_projection_outputs(capsys, policy, memory):
    full = _layer_residuals(capsys, "full")  # the last hidden state and each layer's input
    assert full == ["f32[2,2,9,32]", "f32[2,9,32]"]
    saved = _layer_residuals(capsys, policy)
    # hidden 32, 4 heads x 8 (q, o), 2 kv heads x 8 (k, v), intermediate 64 (gate, up);
    # the layer inputs [layers, B, T, hidden] in the policy's memory
    widths = [16, 16, 32, 32, 32, 64, 64]
    assert saved == sorted(["f32[2,9,32]"] + [f"f32{memory}[2,2,9,{w}]" for w in widths])


def test_default_policy_is_a_known_one():
    assert RunConfig().remat == llama.DEFAULT_REMAT in llama.REMAT_POLICIES
