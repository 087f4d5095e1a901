"""Memory of the next-token loss and its gradient at Llama-3's vocabulary (128,256).

Compiles, for an H100 target (:mod:`deviceless`), the loss of final hidden states
through a frozen bf16 lm_head and its gradient with respect to the hidden states,
two ways: full logits (``token_loss(hidden @ w)``, fp32 ``[B, T, V]``) and
``jpeft.train.loss.chunked_token_loss``. Shapes: the 1.1B model's hidden size with
B=4, T=2048, and Llama-3-8B's with B=1, T=2048. Then the whole 1.1B LoRA train step
(:mod:`lora_step`, full remat) with this vocabulary, which uses the chunked loss.
Prints a markdown table and the command::

    JAX_PLATFORMS=cpu python bench/loss_memory.py
"""

from __future__ import annotations

import shlex
import sys

import jax
import jax.numpy as jnp
from deviceless import abstract, compile_on, gpu_target_available, peak_bytes, target_mesh
from lora_step import lora_step

from jpeft.train.loss import chunked_token_loss, token_loss

VOCAB = 128_256
SHAPES = {"1.1B (hidden 2048), B=4": (4, 2048, 2048), "8B (hidden 4096), B=1": (1, 2048, 4096)}


def loss_gradient(chunked: bool):
    """``d loss / d hidden`` of a frozen lm_head ``w`` over every token."""

    def grad(hidden: jax.Array, w: jax.Array, ids: jax.Array) -> jax.Array:
        ones = jnp.ones_like(ids)
        if chunked:
            head = lambda params, h, index: h @ w
            loss = lambda h: chunked_token_loss(h, head, {}, ids, ones)[0]
        else:
            loss = lambda h: token_loss(h @ w, ids, ones)[0]
        return jax.grad(loss)(hidden)

    return grad


def main() -> None:
    mesh = target_mesh()
    target = "H100 (deviceless)" if gpu_target_available() else "CPU (no CUDA plugin)"
    print(f"vocab {VOCAB:,}, T=2048, bf16 hidden states and lm_head; compiled for {target}\n")
    print("| program | loss | peak GB | temp GB |")
    print("|---|---|---:|---:|")
    for name, (b, t, hidden) in SHAPES.items():
        s = jax.ShapeDtypeStruct
        args = abstract(
            (
                s((b, t, hidden), jnp.bfloat16),
                s((hidden, VOCAB), jnp.bfloat16),
                s((b, t), jnp.int32),
            ),
            mesh,
        )
        for chunked in (False, True):
            compiled = compile_on(mesh, loss_gradient(chunked), *args)
            temp = compiled.memory_analysis().temp_size_in_bytes
            label = "chunked" if chunked else "full logits"
            print(f"| loss + grad, {name} | {label} | {peak_bytes(compiled) / 1e9:.2f} | "
                  f"{temp / 1e9:.2f} |", flush=True)  # fmt: skip
    step, inputs = lora_step(mesh, vocab=VOCAB)
    compiled = compile_on(mesh, step, *inputs, donate_argnums=(0,))
    temp = compiled.memory_analysis().temp_size_in_bytes
    print(f"| 1.1B LoRA train step, B=4 | chunked | {peak_bytes(compiled) / 1e9:.2f} | "
          f"{temp / 1e9:.2f} |")  # fmt: skip
    print(f"\n    JAX_PLATFORMS=cpu python {shlex.join(sys.argv)}")


if __name__ == "__main__":
    main()
