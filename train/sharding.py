"""Device meshes and shardings from logical axes (see :mod:`jpeft.sharding`).

Rules map logical axis names to mesh axes: ``fsdp`` shards the hidden size
(``embed``), ``tensor`` shards attention heads, the MLP width and the vocabulary,
and batches are split over ``("data", "fsdp")``. A dimension that does not
divide by its mesh axes stays replicated, as does every array with no known
logical axes. One code path serves 1 CPU, 8 GPUs and a multi-host pod::

    mesh = make_mesh("data=2,fsdp=2,tensor=2")
    step, state, frozen = sharded_train_step(mesh, state, frozen)
    state, metrics = step(state, frozen, shard_batch(batch, mesh))
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jpeft.models.pytree import Tree
from jpeft.partition import combine
from jpeft.sharding import is_axes, logical_axes
from jpeft.train.state import TrainState
from jpeft.train.step import Batch, train_step

Rules = Mapping[str, str | tuple[str, ...] | None]

MESH_AXES = ("data", "fsdp", "tensor")
RULES: dict[str, str | tuple[str, ...] | None] = {
    "batch": ("data", "fsdp"),
    "vocab": "tensor",
    "embed": "fsdp",
    "heads": "tensor",
    "kv_heads": "tensor",
    "mlp": "tensor",
    "norm": None,
    "layers": None,
}


def parse_mesh(spec: str | Mapping[str, int], n_devices: int) -> dict[str, int]:
    """Axis sizes from ``"data=2,fsdp=2,tensor=2"``; one size may be -1 (the rest).

    Missing axes get size 1; the sizes must multiply to ``n_devices``.

    Example:
        >>> parse_mesh("fsdp=2,data=-1", 8)
        {'data': 4, 'fsdp': 2, 'tensor': 1}
    """
    sizes = dict(spec) if isinstance(spec, Mapping) else _parse_spec(spec)
    unknown = sorted(set(sizes) - set(MESH_AXES))
    if unknown:
        raise ValueError(f"mesh axes {unknown} are unknown; valid axes are {list(MESH_AXES)}")
    fill = [name for name, size in sizes.items() if size == -1]
    if len(fill) > 1 or any(size < 1 and size != -1 for size in sizes.values()):
        raise ValueError(f"mesh {spec!r}: sizes must be positive, with at most one -1")
    known = math.prod(size for size in sizes.values() if size != -1)
    if fill:
        if n_devices % known:
            raise ValueError(f"mesh {spec!r}: {n_devices} devices do not divide by {known}")
        sizes[fill[0]] = n_devices // known
    out = {name: sizes.get(name, 1) for name in MESH_AXES}
    if math.prod(out.values()) != n_devices:
        raise ValueError(
            f"mesh {spec!r} has {math.prod(out.values())} devices, but {n_devices} are available"
        )
    return out


def _parse_spec(spec: str) -> dict[str, int]:
    sizes: dict[str, int] = {}
    for part in filter(None, (p.strip() for p in spec.split(","))):
        name, sep, value = part.partition("=")
        if not sep or not value.strip().lstrip("-").isdigit():
            raise ValueError(f"mesh {spec!r}: expected 'axis=size' items, got {part!r}")
        sizes[name.strip()] = int(value)
    return sizes


def make_mesh(spec: str | Mapping[str, int] = "data=-1", devices: Any = None) -> Mesh:
    """A ``Mesh`` with axes ``("data", "fsdp", "tensor")`` over ``devices`` (default: all).

    Example:
        >>> make_mesh("data=-1").shape["data"] == jax.device_count()
        True
    """
    devices = jax.devices() if devices is None else list(devices)
    sizes = parse_mesh(spec, len(devices))
    auto = (jax.sharding.AxisType.Auto,) * len(MESH_AXES)
    return jax.make_mesh(tuple(sizes.values()), MESH_AXES, axis_types=auto, devices=devices)


def partition_spec(
    axes: tuple[str | None, ...], shape: tuple[int, ...], mesh: Mesh, rules: Rules = RULES
) -> PartitionSpec:
    """The mesh ``PartitionSpec`` for one array from its logical ``axes``.

    A dimension whose size does not divide by its mesh axes' sizes, or whose mesh
    axis another dimension already uses, is replicated.

    Example:
        >>> mesh = make_mesh("data=-1")  # one CPU device: nothing to shard
        >>> tuple(partition_spec(("layers", "embed", "mlp"), (2, 4, 8), mesh))
        (None, None, None)
    """
    used: set[str] = set()
    spec: list[Any] = []
    for name, size in zip(axes, shape, strict=True):
        target = rules.get(name) if name is not None else None
        names = (target,) if isinstance(target, str) else tuple(target or ())
        names = tuple(a for a in names if mesh.shape.get(a, 1) > 1 and a not in used)
        if not names or size % math.prod(mesh.shape[a] for a in names):
            spec.append(None)
            continue
        used.update(names)
        spec.append(names[0] if len(names) == 1 else names)
    return PartitionSpec(*spec)


def tree_shardings(tree: Tree, mesh: Mesh, params: Tree, rules: Rules = RULES) -> Tree:
    """``NamedSharding`` for every array of ``tree``, from the logical axes of ``params``.

    ``tree`` may be the params, either part of :func:`jpeft.split`, an optimizer
    state or a whole :class:`TrainState`: an array takes the axes of the params
    array whose path is the longest suffix of its own path and whose shape is the
    same (so Adam's ``mu`` and ``nu`` follow the trainable layout); anything else
    is replicated.

    Example:
        >>> import jax.numpy as jnp
        >>> params = {"norm": {"scale": jnp.ones(4)}}
        >>> tuple(tree_shardings(params, make_mesh(), params)["norm"]["scale"].spec)
        (None,)
    """
    table = _axes_table(params)
    paths, treedef = jax.tree_util.tree_flatten_with_path(tree)
    out = []
    for path, leaf in paths:
        shape = tuple(np.shape(leaf))
        axes = _lookup(table, tuple(path), shape)
        out.append(NamedSharding(mesh, partition_spec(axes, shape, mesh, rules)))
    return jax.tree_util.tree_unflatten(treedef, out)


def _axes_table(params: Tree) -> dict[tuple[Any, ...], tuple[tuple[int, ...], Any]]:
    shapes = {tuple(p): tuple(np.shape(x)) for p, x in jax.tree_util.tree_leaves_with_path(params)}
    axes = jax.tree_util.tree_leaves_with_path(logical_axes(params), is_leaf=is_axes)
    return {tuple(p): (shapes[tuple(p)], a) for p, a in axes if tuple(p) in shapes}


def _lookup(table: dict, path: tuple[Any, ...], shape: tuple[int, ...]) -> tuple:
    for start in range(len(path)):
        hit = table.get(path[start:])
        if hit is not None and hit[0] == shape:
            return hit[1]
    return (None,) * len(shape)


def batch_sharding(mesh: Mesh, rules: Rules = RULES) -> NamedSharding:
    """Sharding of batch arrays: the leading (batch) axis over the ``batch`` rule.

    Example:
        >>> batch_sharding(make_mesh("data=-1")).mesh.axis_names
        ('data', 'fsdp', 'tensor')
    """
    target = rules.get("batch")
    names = (target,) if isinstance(target, str) else tuple(target or ())
    names = tuple(a for a in names if mesh.shape.get(a, 1) > 1)
    return NamedSharding(mesh, PartitionSpec(names[0] if len(names) == 1 else (names or None)))


def shard_batch(batch: Batch, mesh: Mesh, rules: Rules = RULES) -> Batch:
    """Global arrays from this process's rows of ``batch`` (all rows on one host).

    Example:
        >>> import jax.numpy as jnp
        >>> b = shard_batch({"input_ids": jnp.zeros((8, 4), jnp.int32)}, make_mesh())
        >>> b["input_ids"].shape
        (8, 4)
    """
    sharding = batch_sharding(mesh, rules)
    spec = sharding.spec[0]
    names = (spec,) if isinstance(spec, str) else tuple(spec or ())
    shards = math.prod(mesh.shape[a] for a in names) // jax.process_count()
    out = {}
    for key, value in batch.items():
        rows = np.shape(value)[0]
        if rows % max(shards, 1):
            raise ValueError(
                f"batch[{key!r}] has {rows} rows on this process, not a multiple of the "
                f"{shards} local batch shards of mesh {dict(mesh.shape)}"
            )
        out[key] = jax.make_array_from_process_local_data(sharding, np.asarray(value))
    return out


def sharded_train_step(
    mesh: Mesh,
    state: TrainState,
    frozen: Tree,
    rules: Rules = RULES,
    accum: int | None = None,
) -> tuple[Any, TrainState, Tree]:
    """``(step, state, frozen)``: a jitted, state-donating :func:`train_step` on ``mesh``.

    ``state`` and ``frozen`` come back placed on their shardings; feed batches
    through :func:`shard_batch`.

    Example:
        >>> # step, state, frozen = sharded_train_step(make_mesh("fsdp=-1"), state, frozen)
        >>> # state, metrics = step(state, frozen, shard_batch(batch, mesh))
    """
    params = combine(state.trainable, frozen)
    state_sh = tree_shardings(state, mesh, params, rules)
    frozen_sh = tree_shardings(frozen, mesh, params, rules)
    step = jax.jit(
        functools.partial(train_step, accum=accum),
        in_shardings=(state_sh, frozen_sh, batch_sharding(mesh, rules)),
        out_shardings=(state_sh, NamedSharding(mesh, PartitionSpec())),
        donate_argnums=0,
    )
    return step, jax.device_put(state, state_sh), jax.device_put(frozen, frozen_sh)
