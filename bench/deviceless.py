"""Compile for an H100 without one: device memory from the real GPU program, FLOPs from the jaxpr.

XLA's GPU compiler runs on this CPU machine when the CUDA PJRT plugin
(``jax-cuda12-plugin`` / ``jax-cuda12-pjrt`` matching the jax version, about 500 MB; a
benchmark's environment, not CI's) is given an H100 target description instead of a
device (``shared/tools/deviceless-gpu-compile.md``). The compiled program is the one a
real H100 would run: its :func:`peak_bytes` is the device memory it needs. It has no
cost analysis, so :func:`jaxpr_flops` counts matmul FLOPs from the traced program.

Without the plugin (as in CI), :func:`target_mesh` falls back to the CPU devices, so the
same code runs and is tested everywhere; :func:`gpu_target_available` says which it is.

Example:
    >>> import jax.numpy as jnp
    >>> mesh = target_mesh(prefer_gpu=False)
    >>> x = abstract(jax.ShapeDtypeStruct((8, 16), jnp.float32), mesh)
    >>> peak_bytes(compile_on(mesh, lambda a: a @ a.T, x)) >= 8 * 16 * 4
    True
    >>> jaxpr_flops(lambda a: a @ a.T, x)
    2048
"""

from __future__ import annotations

import functools
import math
import os
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
from jax.experimental import topologies
from jax.sharding import Mesh, NamedSharding, PartitionSpec


def _find_target_config() -> str:
    """``$JPEFT_H100_TARGET``, else ``shared/tools/h100_sxm.txtpb`` in a folder above this one."""
    if "JPEFT_H100_TARGET" in os.environ:
        return os.environ["JPEFT_H100_TARGET"]
    folder = os.path.dirname(os.path.abspath(__file__))
    while True:
        candidate = os.path.join(folder, "shared", "tools", "h100_sxm.txtpb")
        parent = os.path.dirname(folder)
        if os.path.isfile(candidate) or parent == folder:
            return candidate
        folder = parent


TARGET_CONFIG = _find_target_config()


@functools.cache
def gpu_target_available(target_config: str = TARGET_CONFIG) -> bool:
    """True when the CUDA plugin and the H100 target description are both here."""
    if not os.path.isfile(target_config):
        return False
    try:
        import jax_plugins.xla_cuda12  # noqa: F401
    except ImportError:
        return False
    return True


def target_mesh(
    shape: tuple[int, ...] = (1,),
    axes: tuple[str, ...] = ("x",),
    *,
    prefer_gpu: bool = True,
    target_config: str = TARGET_CONFIG,
) -> Mesh:
    """A mesh of H100 compile targets (``shape`` devices), or of CPU devices without them.

    Raises:
        ValueError: the CPU fallback has fewer devices than ``shape`` asks for.
    """
    count = math.prod(shape)
    if prefer_gpu and gpu_target_available(target_config):
        with open(target_config) as f:
            spec = f.read()
        topology = f"1x1x{count}" if count > 1 else "1x1x1"
        devices = topologies.get_topology_desc(
            "", "cuda", target_config=spec, topology=topology
        ).devices
    else:
        devices = jax.devices("cpu")
    if len(devices) < count:
        raise ValueError(f"a mesh of {shape} needs {count} devices; {len(devices)} are here")
    return Mesh(np.array(devices[:count]).reshape(shape), axes)


def abstract(tree: Any, mesh: Mesh, spec: Callable[[Any], PartitionSpec] | None = None) -> Any:
    """``tree`` of arrays or ShapeDtypeStructs as ShapeDtypeStructs placed on ``mesh``.

    ``spec(leaf) -> PartitionSpec`` shards each leaf (default: replicated).
    """

    def place(leaf: Any) -> jax.ShapeDtypeStruct:
        partition = spec(leaf) if spec is not None else PartitionSpec()
        sharding = NamedSharding(mesh, partition)
        return jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=sharding)

    return jax.tree.map(place, tree)


def compile_on(
    mesh: Mesh, fn: Callable[..., Any], *args: Any, donate_argnums: tuple[int, ...] = ()
) -> Any:
    """``jax.jit(fn).lower(*args).compile()`` on the mesh (``args`` from :func:`abstract`)."""
    with mesh:
        return jax.jit(fn, donate_argnums=donate_argnums).lower(*args).compile()


def peak_bytes(compiled: Any) -> int:
    """Device bytes a compiled program needs: arguments + outputs - donated aliases + temps."""
    m = compiled.memory_analysis()
    return int(
        m.argument_size_in_bytes
        + m.output_size_in_bytes
        - m.alias_size_in_bytes
        + m.temp_size_in_bytes
    )


# Primitives whose sub-jaxprs run once per call (custom_partitioning keeps its in `call`);
# scan bodies run `length` times.
_CALL_PARAMS = ("jaxpr", "call_jaxpr", "fun_jaxpr", "call")


def jaxpr_flops(fn: Callable[..., Any], *args: Any, platform: str | None = None) -> int:
    """Matmul FLOPs (2 per multiply-add) of one call of ``fn``, counted from its jaxpr.

    Counts ``dot_general`` (and ``pallas_call`` kernels through their ``cost_estimate``),
    descends into called jaxprs (``pjit``, ``remat``/``checkpoint``, custom derivatives),
    multiplies scan bodies by their length and takes the costlier branch of a ``cond``,
    except that a ``jax.lax.platform_dependent`` choice takes the branch ``platform``
    (e.g. ``"cuda"``) lowers to, when given. Equations whose results nothing uses are
    skipped, as XLA drops them (JAX keeps dead ``pallas_call``s, e.g. a recomputed
    forward kernel whose outputs a remat policy saved).
    Rematerialised forward passes appear in the differentiated jaxpr, so they are counted.
    Elementwise work is not counted (it is memory-bound, and a small share of a step).
    """
    return _count(jax.make_jaxpr(fn)(*args).jaxpr, platform)


def _platform_branch(eqn: Any, platform: str | None) -> Any | None:
    """The branch of a ``platform_dependent`` cond that ``platform`` lowers, else None."""
    choices = eqn.params.get("branches_platforms")
    if platform is None or choices is None:
        return None
    for branch, platforms in zip(eqn.params["branches"], choices, strict=True):
        if platforms is None or platform in platforms:
            return branch
    return None


def _live(jaxpr: Any) -> list[Any]:
    """The equations of ``jaxpr`` that its outputs (or an effect) depend on."""
    needed = {id(v) for v in jaxpr.outvars}
    kept = []
    for eqn in reversed(jaxpr.eqns):
        if eqn.effects or any(id(v) in needed for v in eqn.outvars):
            needed.update(id(v) for v in eqn.invars)
            kept.append(eqn)
    return kept[::-1]


def _count(jaxpr: Any, platform: str | None = None) -> int:
    total = 0
    for eqn in _live(jaxpr):
        name = eqn.primitive.name
        if name == "dot_general":
            total += _dot_flops(eqn)
        elif name == "pallas_call":
            estimate = eqn.params.get("cost_estimate")
            total += int(estimate.flops) if estimate is not None else 0
        elif name == "scan":
            total += eqn.params["length"] * _count(eqn.params["jaxpr"].jaxpr, platform)
        elif name == "cond":
            chosen = _platform_branch(eqn, platform)
            branches = eqn.params["branches"] if chosen is None else [chosen]
            total += max(_count(branch.jaxpr, platform) for branch in branches)
        else:
            for key in _CALL_PARAMS:
                if key in eqn.params:
                    sub = eqn.params[key]
                    total += _count(getattr(sub, "jaxpr", sub), platform)
                    break
    return total


def _dot_flops(eqn: Any) -> int:
    (lhs_contract, _), (lhs_batch, _) = eqn.params["dimension_numbers"]
    lhs, rhs = (v.aval.shape for v in eqn.invars)
    out = eqn.outvars[0].aval.shape
    contracted = math.prod(lhs[d] for d in lhs_contract)
    del rhs, lhs_batch  # the output shape holds the batch and free dimensions
    return 2 * math.prod(out) * contracted
