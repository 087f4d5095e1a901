"""The Flax LLaMA equals transformers' LlamaForCausalLM on a tiny random model."""

import jax.numpy as jnp
import numpy as np
import torch
from conftest import hf_twin

from jpeft.models import llama


def test_logits_match_transformers(params, cfg, batch):
    ids, mask = batch
    ref = hf_twin(params, cfg)(torch.tensor(ids), attention_mask=torch.tensor(mask)).logits
    ref = ref.detach().numpy()
    out = np.asarray(llama.forward(params, cfg, jnp.asarray(ids), attention_mask=jnp.asarray(mask)))
    valid = mask.astype(bool)
    err = np.abs(out - ref)[valid].max() / np.abs(ref[valid]).max()
    assert err < 1e-5
