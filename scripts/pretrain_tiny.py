"""Pretrain the bundled tiny LLaMA on the bundled corpus (deterministic, CPU, no downloads).

    python scripts/make_dataset.py      # assets/data/{corpus.txt, train.jsonl, eval.jsonl}
    python scripts/make_tokenizer.py    # assets/tiny-llama/tokenizer*
    python scripts/pretrain_tiny.py     # assets/tiny-llama/{config.json, model.safetensors}

Every weight is trained in full through jpeft's own path: each base tensor is wrapped in
a :class:`jpeft.Trained` node, so ``jpeft.train.train_step`` differentiates all of them, and
``jpeft.merge`` unwraps them for ``jpeft.models.hf.save_pretrained``. The corpus is cut into
``<s> document </s>`` pieces and packed into rows (packed segments never attend to each
other). The same arguments give the same weights on the same software.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jpeft
from jpeft.models import hf, llama
from jpeft.models.config import LlamaConfig
from jpeft.models.tokenizer import Tokenizer
from jpeft.train import TrainState, data, eval_step, train_step


def model_config(args: argparse.Namespace, tokenizer: Tokenizer) -> LlamaConfig:
    """A LLaMA sized by the arguments, with the tokenizer's vocabulary and special ids."""
    return LlamaConfig(
        vocab_size=tokenizer.vocab_size,
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads,
        max_position_embeddings=args.context,
        rms_norm_eps=1e-5,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_id,
        eos_token_id=tokenizer.eos_id,
        pad_token_id=tokenizer.pad_id,
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default="assets/data", help="directory with corpus.txt")
    p.add_argument("--out", default="assets/tiny-llama", help="model directory (has tokenizer)")
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--intermediate", type=int, default=384)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--context", type=int, default=256, help="max_position_embeddings")
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()

    tokenizer = Tokenizer.from_dir(args.out)
    cfg = model_config(args, tokenizer)
    docs = data.read_documents(os.path.join(args.data, "corpus.txt"))
    examples = data.corpus_examples(tokenizer, docs, max_len=args.seq_len)
    order = np.random.default_rng(args.seed).permutation(len(examples))
    held_out = [examples[i] for i in order[:256]]
    examples = [examples[i] for i in order[256:]]
    batches = data.BatchIterator(
        examples, batch_size=args.batch_size, seq_len=args.seq_len, seed=args.seed
    )
    eval_batches = list(
        data.BatchIterator(
            held_out, batch_size=args.batch_size, seq_len=args.seq_len, shuffle=False
        ).epoch_batches()
    )

    base = llama.init_params(jax.random.key(args.seed), cfg)
    trainable, frozen = jpeft.split(jax.tree.map(jpeft.Trained, base))
    warmup = min(100, args.steps // 10)
    lr = optax.warmup_cosine_decay_schedule(0.0, args.lr, warmup, args.steps, args.lr * 0.05)
    tx = optax.chain(
        optax.clip_by_global_norm(1.0),
        optax.adamw(lr, b2=0.98, weight_decay=0.05, mask=lambda t: jax.tree.map(_is_matrix, t)),
    )
    model = llama.Llama(cfg)
    state = TrainState.create(apply_fn=model.apply, trainable=trainable, tx=tx, rng=args.seed)
    step = jax.jit(train_step, donate_argnums=0)
    evaluate = jax.jit(eval_step)

    n_params = sum(x.size for x in jax.tree.leaves(base))
    print(f"{n_params:,} params, {len(examples)} pieces of <= {args.seq_len} tokens")
    start = time.perf_counter()
    for i in range(1, args.steps + 1):
        state, metrics = step(state, frozen, next(batches))
        if i % 100 == 0 or i == args.steps:
            sums = [evaluate(state, frozen, b) for b in eval_batches]
            held = float(sum(s["loss_sum"] for s in sums) / sum(s["tokens"] for s in sums))
            print(
                f"step {i}: loss {float(metrics['loss']):.3f}  held-out {held:.3f} "
                f"(perplexity {np.exp(held):.2f})  {time.perf_counter() - start:.0f}s",
                flush=True,
            )
    params = jpeft.merge(jpeft.combine(state.trainable, frozen))
    hf.save_pretrained(args.out, cfg, params, dtype=jnp.float32)
    print(f"wrote {args.out}/config.json and model.safetensors")


def _is_matrix(x: jax.Array) -> bool:
    return x.ndim >= 2


if __name__ == "__main__":
    main()
