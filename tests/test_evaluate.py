"""The CLI's evaluation goes through eval_step and honours per-row task/adapter ids."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jpeft
from jpeft.models import hf, llama
from jpeft.models.context import Context
from jpeft.models.tokenizer import Tokenizer
from jpeft.train import data
from jpeft.train.evaluate import Evaluator
from jpeft.train.sharding import make_mesh
from jpeft.train.step import batch_loss

MODEL = jpeft.assets.path("tiny-llama")


@pytest.fixture(scope="module")
def setup():
    cfg, params = hf.load_pretrained(MODEL)
    method = jpeft.MultitaskPromptTuning(num_virtual_tokens=2, num_tasks=2)
    params = method.init(jax.random.key(0), params, cfg)
    tok = Tokenizer.from_dir(MODEL)
    records = data.read_data(jpeft.assets.path("data/eval.jsonl"))[:2]
    return cfg, params, tok, records, data.encode_records(tok, records)


def _evaluator(setup, **kw):
    cfg, _, tok, records, examples = setup
    return Evaluator(
        cfg, tok, examples, records, mesh=make_mesh(), batch_size=2, seq_len=64, packing=False,
        max_new_tokens=2, **kw,
    )  # fmt: skip


def test_loss_uses_the_task_of_every_row(setup):
    cfg, params, *_ = setup
    evaluator = _evaluator(setup, row_ids={"task_ids": 1})
    (batch,) = evaluator.loss_batches
    ids = jnp.asarray(batch["input_ids"])
    ctx = Context(task_ids=jnp.array([1, 1]))
    logits = llama.forward(params, cfg, ids, attention_mask=batch["attention_mask"], ctx=ctx)
    total, count = batch_loss(logits, jax.tree.map(jnp.asarray, batch))
    np.testing.assert_allclose(evaluator.loss(params)[0], total / count, rtol=1e-5)
    assert evaluator.accuracy(params)[0] is not None  # generation gets the task ids too
    with pytest.raises(ValueError, match="needs task_ids"):
        _evaluator(setup).loss(params)
