"""Forward-pass tokens/s of jpeft (jax.jit, XLA CPU) against transformers (torch eager) on CPU.

Both run the same random weights (saved by ``jpeft.models.hf.save_pretrained``, read by
``LlamaForCausalLM.from_pretrained``) in fp32 on the same CPU set: the process is
pinned to ``--threads`` cores before jax and torch start, and torch uses that many
intra-op threads. Prints a markdown table and the command that produced it::

    python bench/forward.py --hidden 256 --layers 4 --batch 8 --seq 128 --threads 2
"""

from __future__ import annotations

import platform
import shlex
import sys
import tempfile

from common import config_from, model_parser, pin_threads, seconds_per_call


def main() -> None:
    args = model_parser(__doc__.splitlines()[0], repeats=10).parse_args()
    pin_threads(args.threads)
    import jax
    import jax.numpy as jnp
    import numpy as np
    import torch
    import transformers

    from jpeft.models import hf, llama

    torch.set_num_threads(args.threads)
    cfg = config_from(args)
    params = llama.init_params(jax.random.key(0), cfg)
    with tempfile.TemporaryDirectory() as tmp:
        hf.save_pretrained(tmp, cfg, params)
        model = transformers.LlamaForCausalLM.from_pretrained(tmp, dtype=torch.float32).eval()
    ids = np.random.default_rng(0).integers(0, cfg.vocab_size, (args.batch, args.seq))

    forward = jax.jit(lambda p, x: llama.forward(p, cfg, x))
    jax_ids = jnp.asarray(ids, jnp.int32)
    torch_ids = torch.tensor(ids)

    def run_torch() -> torch.Tensor:
        with torch.inference_mode():
            return model(torch_ids).logits

    ours, ref = np.asarray(forward(params, jax_ids)), run_torch().numpy()
    err = np.abs(ours - ref).max() / np.abs(ref).max()
    rows = {
        "jpeft (jax.jit, XLA)": seconds_per_call(
            lambda: forward(params, jax_ids).block_until_ready(), args.repeats
        ),
        f"transformers (torch eager, {model.config._attn_implementation})": seconds_per_call(
            run_torch, args.repeats
        ),
    }
    tokens = args.batch * args.seq
    base = rows[list(rows)[-1]]
    print(f"`{shlex.join(['python', *sys.argv])}`\n")
    print(
        f"{platform.processor() or platform.machine()}, threads={args.threads}, fp32, "
        f"B={args.batch} T={args.seq}, hidden {args.hidden}, {args.layers} layers, "
        f"vocab {args.vocab}; jax {jax.__version__}, torch {torch.__version__}, "
        f"transformers {transformers.__version__}; logits max rel err {err:.1e}\n"
    )
    print("| implementation | ms / forward | tokens/s | tokens/s vs transformers |")
    print("|---|---:|---:|---:|")
    for name, seconds in rows.items():
        print(f"| {name} | {seconds * 1e3:.1f} | {tokens / seconds:,.0f} | {base / seconds:.2f}x |")


if __name__ == "__main__":
    main()
