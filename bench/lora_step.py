"""LoRA train-step tokens/s of jpeft (jax.jit) against HF peft + transformers on CPU.

Same random base (saved by ``models.hf.save_pretrained``), LoRA r=16 alpha=32 on
q_proj/v_proj, AdamW, fp32, next-token loss on every token, same CPU set. Prints
a markdown table and the command that produced it::

    python bench/lora_step.py --hidden 256 --layers 4 --batch 8 --seq 128 --threads 2
"""

from __future__ import annotations

import shlex
import sys
import tempfile

from common import config_from, model_parser, pin_threads, seconds_per_call


def main() -> None:
    args = model_parser(__doc__.splitlines()[0], repeats=5).parse_args()
    pin_threads(args.threads)
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax
    import peft
    import torch
    import transformers

    import jpeft
    from models import hf, llama
    from train import TrainState, train_step

    torch.set_num_threads(args.threads)
    cfg = config_from(args)
    base = llama.init_params(jax.random.key(0), cfg)
    with tempfile.TemporaryDirectory() as tmp:
        hf.save_pretrained(tmp, cfg, base)
        model = transformers.LlamaForCausalLM.from_pretrained(tmp, dtype=torch.float32)
    lora = dict(r=16, lora_alpha=32, target_modules=["q_proj", "v_proj"], lora_dropout=0.0)
    peft_model = peft.get_peft_model(model, peft.LoraConfig(**lora)).train()
    torch_opt = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], 2e-4)
    ids = np.random.default_rng(0).integers(0, cfg.vocab_size, (args.batch, args.seq))
    torch_ids = torch.tensor(ids)

    def peft_step() -> None:
        loss = peft_model(input_ids=torch_ids, labels=torch_ids).loss
        loss.backward()
        torch_opt.step()
        torch_opt.zero_grad(set_to_none=True)

    method = jpeft.LoRA(r=16, alpha=32, targets=("q_proj", "v_proj"))
    trainable, frozen = jpeft.split(method.init(jax.random.key(1), base, cfg))
    state = TrainState.create(
        apply_fn=llama.Llama(cfg).apply, trainable=trainable, tx=optax.adamw(2e-4)
    )
    ones = jnp.ones(ids.shape, jnp.int32)
    batch = {"input_ids": jnp.asarray(ids, jnp.int32), "attention_mask": ones, "loss_mask": ones}
    step = jax.jit(train_step, donate_argnums=0)
    holder = {"state": state}

    def jpeft_step() -> None:
        holder["state"], metrics = step(holder["state"], frozen, batch)
        jax.block_until_ready(metrics["loss"])

    rows = {
        "jpeft LoRA (jax.jit)": seconds_per_call(jpeft_step, args.repeats),
        "peft LoRA + transformers (torch eager)": seconds_per_call(peft_step, args.repeats),
    }
    tokens = args.batch * args.seq
    ref = rows["peft LoRA + transformers (torch eager)"]
    print(f"`{shlex.join(['python', *sys.argv])}`\n")
    print(
        f"threads={args.threads}, fp32, B={args.batch} T={args.seq}, hidden {args.hidden}, "
        f"{args.layers} layers, vocab {args.vocab}, LoRA r=16 on q/v, AdamW; "
        f"jax {jax.__version__}, torch {torch.__version__}, peft {peft.__version__}\n"
    )
    print("| implementation | ms / step | tokens/s | tokens/s vs peft |")
    print("|---|---:|---:|---:|")
    for name, seconds in rows.items():
        print(f"| {name} | {seconds * 1e3:.1f} | {tokens / seconds:,.0f} | {ref / seconds:.2f}x |")


if __name__ == "__main__":
    main()
