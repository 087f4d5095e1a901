"""Device memory and cache copies of one compiled decode step, for an H100 target.

Compiles :func:`jpeft.models.generate.decode_step` (one token per row, the KV cache
donated) and a loop of greedy decode steps for an H100 without one
(``bench/deviceless.py``; CPU fallback without the CUDA plugin), and reads from the
compiled program:

- ``memory_analysis()``: argument, output, aliased (donated and reused) and temporary
  bytes. A decode step that updates the cache in place aliases the whole cache and
  needs no cache-sized temporary.
- the optimized HLO (:func:`cache_buffers`): every instruction outside fused
  computations whose result is a cache-sized buffer (all layers, ``[L, B, K, S, D]``,
  or one layer, ``[B, K, S, D]``), by opcode (a fusion by its root's opcode).
  ``dynamic-update-slice`` writes the new token into the cache in place; anything
  else (``copy``, ``broadcast``, a loop fusion) moves the cache (:func:`cache_copies`).

Per-step memory traffic is then the weights plus the cache read once (attention) plus
twice the bytes of every cache-sized copy (read and write). Prints a markdown table
and the command that produced it::

    JAX_PLATFORMS=cpu python bench/decode_memory.py                  # 7B, batch 8, 4k
    JAX_PLATFORMS=cpu python bench/decode_memory.py --layers 2 --hidden 256 --intermediate 512 \\
        --heads 4 --kv-heads 4 --vocab 512 --batch 2 --seq 64         # tiny
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import re
import shlex
import sys
from typing import Any

import jax
import jax.numpy as jnp
from common import config_from, model_parser
from deviceless import abstract, compile_on, gpu_target_available, target_mesh

import jpeft
from jpeft.models import generate as gen
from jpeft.models import llama
from jpeft.models.cache import KVCache
from jpeft.models.context import Context

_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%\S+\s*=\s*(.*?)\s+([\w-]+)\(")
_ARRAY = re.compile(r"\w+\[([\d,]*)\]")
_NO_DATA = ("parameter", "get-tuple-element", "tuple", "bitcast", "while", "call", "conditional")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The model shape (default: LLaMA-2 7B), batch, cache slots (``--seq``) and dtype."""
    parser = model_parser(__doc__.splitlines()[0], repeats=1)
    parser.set_defaults(
        hidden=4096, intermediate=11008, layers=32, heads=32, kv_heads=32, batch=8, seq=4096
    )
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--loop-steps", type=int, default=4, help="decode steps in the loop row")
    parser.add_argument(
        "--prefix-tokens", type=int, default=0, help="decode with prefix tuning (virtual tokens)"
    )
    return parser.parse_args(argv)


def _roots(hlo: str) -> dict[str, str]:
    """Each computation's name and the opcode of its root (``a+b`` for a tuple's operands)."""
    opcodes: dict[str, str] = {}
    roots: dict[str, str] = {}
    name = ""
    for line in hlo.splitlines():
        if not line.startswith(" ") and "{" in line:  # a computation's header
            name = line.split()[1 if line.startswith("ENTRY") else 0].lstrip("%")
            opcodes = {}
            continue
        match = _INSTRUCTION.match(line)
        if not match:
            continue
        opcodes[line.split("=")[0].split()[-1]] = match.group(2)
        if line.lstrip().startswith("ROOT"):
            root = match.group(2)
            if root == "tuple":
                operands = re.findall(r"(%[\w.-]+)", line.split("tuple(", 1)[1])
                root = "+".join(sorted({opcodes.get(o, "?") for o in operands}))
            roots[name] = root
    return roots


def cache_buffers(hlo: str, cache: KVCache) -> collections.Counter[str]:
    r"""What writes each cache-sized buffer of the optimized HLO, with counts.

    Counts the unfused instructions (and fusions) whose result holds an array of the
    cache's shape (all layers, ``[L, B, K, S, D]``) or of one layer (``[B, K, S, D]``)
    with its axes in any order (a transpose) and at least ``S`` slots (a concatenation
    with prefix keys), keyed ``"<opcode> (all layers|one layer)"``. A fusion is named by
    the opcode of its fused root, so the key does not depend on the backend's fusion
    names. Instructions that only name a buffer (parameters, tuples, bitcasts, loops) are left out.

    Example:
        >>> from jpeft.models.config import LlamaConfig
        >>> cfg = LlamaConfig(vocab_size=2, hidden_size=2, intermediate_size=2,
        ...                   num_hidden_layers=2, num_attention_heads=2)
        >>> hlo = ("ENTRY %m (p: f32[2,1,3,2,1]) -> f32[2,1,3,2,1] {\n"
        ...        "  ROOT %c = f32[2,1,3,2,1]{4,3,2,1,0} copy(%p)\n}")
        >>> dict(cache_buffers(hlo, KVCache.create(cfg, batch_size=1, max_len=3)))
        {'copy (all layers)': 1}
    """
    roots = _roots(hlo)
    counts: collections.Counter[str] = collections.Counter()
    fused = False
    for line in hlo.splitlines():
        if not line.startswith(" ") and "{" in line:
            fused = line.lstrip("%").startswith(("fused", "wrapped"))
            continue
        match = _INSTRUCTION.match(line)
        if fused or not match or match.group(2) in _NO_DATA:
            continue
        opcode = match.group(2)
        if opcode == "fusion":
            called = re.search(r"calls=%([\w.-]+)", line)
            opcode = roots.get(called.group(1), "fusion") if called else opcode
        for dims in _ARRAY.findall(match.group(1)):
            extent = cache_extent(tuple(int(d) for d in dims.split(",") if d), cache)
            if extent:
                counts[f"{opcode} ({extent})"] += 1
    return counts


def cache_extent(shape: tuple[int, ...], cache: KVCache) -> str | None:
    """ "all layers" or "one layer" when ``shape`` holds that much of the cache (see
    :func:`cache_buffers`), else None."""
    whole = tuple(cache.k.shape)
    for target, name in ((whole, "all layers"), (whole[1:], "one layer")):
        for i, n in enumerate(shape if len(shape) == len(target) else ()):
            if n >= cache.max_len and sorted(
                (*shape[:i], cache.max_len, *shape[i + 1 :])
            ) == sorted(target):
                return name
    return None


def cache_copies(counts: collections.Counter[str]) -> collections.Counter[str]:
    """The entries of :func:`cache_buffers` that move the cache: all but the in-place
    ``dynamic-update-slice`` writes (which write only the new token's slots)."""
    return collections.Counter(
        {k: n for k, n in counts.items() if not k.startswith("dynamic-update-slice ")}
    )


def step_bytes(weights: int, cache_bytes: int, copies: collections.Counter[str]) -> int:
    """Memory traffic of one decode step: the weights and the cache (k + v) read once,
    plus each cache-sized copy read and written. A one-layer copy sits in the layer
    loop, so it runs once per layer: it moves one cache's worth (of k or v) per step,
    like an all-layers copy."""
    moved = sum(copies.values()) * cache_bytes // 2  # each copy is of k or v
    return weights + cache_bytes + 2 * moved


def _size(n: float) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e8 else f"{n / 1e6:.2f} MB"


def measure(compiled: Any, cache: KVCache, weights: int) -> dict[str, Any]:
    """Memory analysis, the cache-sized HLO buffers and per-step bytes of a compiled program."""
    m = compiled.memory_analysis()
    ops = cache_buffers(compiled.as_text(), cache)
    cache_bytes = 2 * cache.k.size * cache.k.dtype.itemsize
    return {
        "arguments": _size(m.argument_size_in_bytes),
        "outputs": _size(m.output_size_in_bytes),
        "aliased": _size(m.alias_size_in_bytes),
        "temporaries": _size(m.temp_size_in_bytes),
        "cache-sized writes": ", ".join(f"{k} x{n}" for k, n in sorted(ops.items())) or "none",
        "cache copies": str(sum(cache_copies(ops).values())),
        "bytes per step": _size(step_bytes(weights, cache_bytes, cache_copies(ops))),
    }


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    dtype = jnp.dtype(args.dtype)
    cfg = config_from(args)
    ctx = Context(dtype)
    mesh = target_mesh()
    params = jax.eval_shape(lambda: llama.init_params(jax.random.key(0), cfg, dtype))
    if args.prefix_tokens:
        # Without the reparameterization MLP: the same prefix keys/values at decode time.
        prefix = jpeft.PrefixTuning(num_virtual_tokens=args.prefix_tokens, prefix_projection=False)
        params = jax.eval_shape(lambda: prefix.init(jax.random.key(1), params, cfg))
    params = abstract(params, mesh)
    empty = jax.eval_shape(lambda: KVCache.create(cfg, args.batch, args.seq, dtype))
    # A cache that already went through prefill: the decode loop's state.
    cache = abstract(dataclasses.replace(empty, started=True), mesh)
    tokens = abstract(jax.ShapeDtypeStruct((args.batch,), jnp.int32), mesh)

    def step(p: Any, c: KVCache, t: jax.Array) -> tuple[jax.Array, KVCache]:
        return gen.decode_step(p, cfg, t, c, ctx)

    def loop(p: Any, c: KVCache, t: jax.Array) -> tuple[jax.Array, KVCache]:
        def body(_: Any, carry: tuple[jax.Array, KVCache]) -> tuple[jax.Array, KVCache]:
            logits, c = step(p, carry[1], carry[0])
            return jnp.argmax(logits, axis=-1).astype(jnp.int32), c

        return jax.lax.fori_loop(0, args.loop_steps, body, (t, c))

    weights = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(params))
    cache_bytes = 2 * cache.k.size * cache.k.dtype.itemsize
    rows = {
        name: measure(
            compile_on(mesh, fn, params, cache, tokens, donate_argnums=(1,)), cache, weights
        )
        for name, fn in (("decode_step", step), (f"{args.loop_steps} greedy steps", loop))
    }
    target = "H100 (deviceless)" if gpu_target_available() else "CPU (no CUDA plugin)"
    print(f"`{shlex.join(['python', *sys.argv])}`\n")
    print(
        f"{target}: {args.layers} layers, hidden {args.hidden}, batch {args.batch}, "
        f"{args.seq} cache slots, {args.dtype}, {args.prefix_tokens} prefix tokens; "
        f"weights {_size(weights)}, "
        f"KV cache (k + v) {_size(cache_bytes)}\n"
    )
    columns = list(next(iter(rows.values())))
    print("| program | " + " | ".join(columns) + " |")
    print("|---|" + "---|" * len(columns))
    for name, row in rows.items():
        print(f"| {name} | " + " | ".join(row.values()) + " |")


if __name__ == "__main__":
    main()
