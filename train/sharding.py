"""Device meshes and shardings from logical axes (see :mod:`jpeft.sharding`).

Rules map logical axis names to mesh axes: ``fsdp`` shards the hidden size
(``embed``), ``tensor`` shards attention heads, the MLP width and the vocabulary,
and batches are split over ``("data", "fsdp")``. A dimension that does not
divide by its mesh axes stays replicated, as does every array with no known
logical axes. The optimizer state takes the shardings of the params it belongs to
(:func:`optimizer_shardings`), and keeps a paged optimizer's host memory kind. One code
path serves 1 CPU, 8 GPUs and a multi-host pod::

    mesh = make_mesh("data=2,fsdp=2,tensor=2")
    step, state, frozen = sharded_train_step(mesh, state, frozen)
    state, metrics = step(state, frozen, shard_batch(batch, mesh))
"""

from __future__ import annotations

import dataclasses
import functools
import math
import warnings
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jpeft.models.pytree import Tree
from jpeft.optim.adamw8bit import QuantizedMoment
from jpeft.optim.paged import state_memory_kinds
from jpeft.optim.state_map import map_params
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


def tree_shardings(tree: Tree, mesh: Mesh, rules: Rules = RULES) -> Tree:
    """``NamedSharding`` for every array of a params tree (or either part of :func:`jpeft.split`).

    Each array's spec comes from its logical axes (:func:`jpeft.sharding.logical_axes`).

    Example:
        >>> import jax.numpy as jnp
        >>> params = {"norm": {"scale": jnp.ones(4)}}
        >>> tuple(tree_shardings(params, make_mesh())["norm"]["scale"].spec)
        (None,)
    """

    def place(axes: tuple[str | None, ...], leaf: Any) -> NamedSharding:
        return NamedSharding(mesh, partition_spec(axes, tuple(np.shape(leaf)), mesh, rules))

    return jax.tree.map(place, logical_axes(tree), tree, is_leaf=is_axes)


def optimizer_shardings(
    tx: optax.GradientTransformation, opt_state: Tree, params: Tree, param_shardings: Tree
) -> Tree:
    """Shardings of ``opt_state = tx.init(params)`` that follow the params' shardings.

    Every per-parameter entry of the state (found by :func:`optax.tree_map_params`, see
    :mod:`jpeft.optim.state_map`) takes its parameter's sharding: an array of the
    parameter's shape exactly, an 8-bit :class:`jpeft.optim.QuantizedMoment` its codes
    exactly and its absmax on the dimensions it shares with the parameter. Step counts and
    other shared entries are replicated. State that ``tx`` keeps in host memory (see
    :func:`jpeft.optim.paged`) gets the ``pinned_host`` memory kind.

    Warns (``UserWarning`` naming the leaf) where an entry ends up replicated over a mesh
    axis its parameter is sharded over, and replicates the whole state, with a warning, if
    it holds per-parameter entries of an unknown structure.

    Example:
        >>> import jax.numpy as jnp, optax
        >>> params = {"w": jnp.zeros((4, 8))}
        >>> tx = optax.adam(1e-3)
        >>> sh = optimizer_shardings(tx, tx.init(params), params,
        ...                          tree_shardings(params, make_mesh()))
        >>> tuple(sh[0].mu["w"].spec), tuple(sh[0].count.spec)
        ((None, None), ())
    """
    leaves = jax.tree.leaves(param_shardings)
    mesh = leaves[0].mesh if leaves else None
    replicated = NamedSharding(mesh, PartitionSpec())
    names = jax.tree_util.tree_map_with_path(lambda path, _: jax.tree_util.keystr(path), params)

    def follow(entry: Any, param: Any, sharding: NamedSharding, name: str) -> Any:
        if isinstance(entry, optax.MaskedNode):
            return entry
        if isinstance(entry, QuantizedMoment):
            absmax = _follow_dims(sharding, np.shape(entry.absmax), entry.aligned_dims)
            _warn_if_less_sharded(sharding, absmax, f"{name} (8-bit absmax)")
            return dataclasses.replace(entry, codes=sharding, absmax=absmax)
        if np.shape(entry) == np.shape(param):
            return sharding
        _warn_if_less_sharded(sharding, replicated, f"{name} (state of shape {np.shape(entry)})")
        return replicated

    def shared(subtree: Any) -> Any:
        for leaf in jax.tree.leaves(subtree):
            if np.size(leaf) > 1:
                warnings.warn(
                    f"optimizer state: a shared {np.shape(leaf)} array of {type(subtree).__name__}"
                    " belongs to no parameter; it is replicated",
                    stacklevel=3,
                )
        return jax.tree.map(lambda _: replicated, subtree)

    try:
        shardings = map_params(
            tx, follow, opt_state, params, param_shardings, names, non_params=shared
        )
    except (ValueError, TypeError) as error:
        warnings.warn(
            f"optimizer state: cannot match its entries to the params ({error}); "
            "the whole state is replicated",
            stacklevel=2,
        )
        shardings = jax.tree.map(lambda _: replicated, opt_state)
    kinds = state_memory_kinds(tx, params)
    return jax.tree.map(
        lambda sh, kind: sh if kind is None else sh.update(memory_kind=kind), shardings, kinds
    )


def _follow_dims(sharding: NamedSharding, shape: tuple[int, ...], aligned: int) -> NamedSharding:
    """``sharding`` on the first ``aligned`` dims of ``shape`` (where they divide), else None."""
    spec = tuple(sharding.spec) + (None,) * len(shape)
    out = []
    for dim, size in enumerate(shape):
        names = spec[dim] if dim < aligned else None
        axes = (names,) if isinstance(names, str) else tuple(names or ())
        divides = size % math.prod(sharding.mesh.shape[a] for a in axes) == 0
        out.append(names if divides else None)
    return NamedSharding(sharding.mesh, PartitionSpec(*out))


def _mesh_axes(sharding: NamedSharding) -> set[str]:
    out: set[str] = set()
    for names in sharding.spec:
        out.update((names,) if isinstance(names, str) else tuple(names or ()))
    return out


def _warn_if_less_sharded(param: NamedSharding, state: NamedSharding, name: str) -> None:
    lost = sorted(_mesh_axes(param) - _mesh_axes(state))
    if lost:
        warnings.warn(
            f"optimizer state of {name}: replicated over mesh axes {lost} that shard the "
            f"parameter ({param.spec} -> {state.spec})",
            stacklevel=4,
        )


def state_shardings(state: TrainState, mesh: Mesh, rules: Rules = RULES) -> TrainState:
    """``state`` with every array replaced by its ``NamedSharding`` on ``mesh``.

    The trainable params follow their logical axes, the optimizer state follows the
    params (:func:`optimizer_shardings`), the step and dropout key are replicated.
    ``state`` may be abstract (``jax.eval_shape`` of ``TrainState.create``).

    Example:
        >>> import jax.numpy as jnp, optax
        >>> state = TrainState.create(apply_fn=None, trainable={"w": jnp.ones((2, 2))},
        ...                           tx=optax.adam(1e-3))
        >>> tuple(state_shardings(state, make_mesh()).opt_state[0].nu["w"].spec)
        (None, None)
    """
    trainable = tree_shardings(state.trainable, mesh, rules)
    replicated = NamedSharding(mesh, PartitionSpec())
    opt_state = optimizer_shardings(state.tx, state.opt_state, state.trainable, trainable)
    return state.replace(step=replicated, trainable=trainable, opt_state=opt_state, rng=replicated)


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


def jit_train_step(
    mesh: Mesh,
    state: TrainState,
    frozen: Tree,
    rules: Rules = RULES,
    accum: int | None = None,
) -> tuple[Any, TrainState, Tree]:
    """``(step, state shardings, frozen shardings)``: :func:`train_step` jitted for ``mesh``.

    The step donates the state and keeps every array on its sharding, host-memory
    optimizer state included. ``state`` and ``frozen`` may be abstract and ``mesh`` an
    ``AbstractMesh`` (to compile for a device that is not here: lower the step inside
    ``jax.set_mesh`` of a concrete mesh).

    Example:
        >>> import jpeft
        >>> from jpeft.models import hf
        >>> from jpeft.train.build import create_state
        >>> from jpeft.train.config import RunConfig
        >>> cfg, base = hf.load_pretrained("assets/tiny-llama")
        >>> trainable, frozen = jpeft.split(jpeft.LoRA(r=2).init(jax.random.key(0), base, cfg))
        >>> state = create_state(RunConfig(), trainable, cfg)
        >>> step, state_sh, frozen_sh = jit_train_step(make_mesh(), state, frozen)
        >>> state_sh.step.spec
        P()
    """
    state_sh = state_shardings(state, mesh, rules)
    frozen_sh = tree_shardings(frozen, mesh, rules)
    step = jax.jit(
        functools.partial(train_step, accum=accum),
        in_shardings=(state_sh, frozen_sh, batch_sharding(mesh, rules)),
        out_shardings=(state_sh, NamedSharding(mesh, PartitionSpec())),
        donate_argnums=0,
    )
    return step, state_sh, frozen_sh


def sharded_train_step(
    mesh: Mesh,
    state: TrainState,
    frozen: Tree,
    rules: Rules = RULES,
    accum: int | None = None,
) -> tuple[Any, TrainState, Tree]:
    """``(step, state, frozen)``: a jitted, state-donating :func:`train_step` on ``mesh``.

    ``state`` and ``frozen`` come back placed on their shardings (see
    :func:`jit_train_step`); feed batches through :func:`shard_batch`.

    Example:
        >>> import jpeft
        >>> from jpeft.models import hf
        >>> from jpeft.train.build import create_state
        >>> from jpeft.train.config import RunConfig
        >>> cfg, base = hf.load_pretrained("assets/tiny-llama")
        >>> trainable, frozen = jpeft.split(jpeft.LoRA(r=2).init(jax.random.key(0), base, cfg))
        >>> state = create_state(RunConfig(), trainable, cfg)
        >>> mesh = make_mesh("fsdp=-1")
        >>> step, state, frozen = sharded_train_step(mesh, state, frozen)
        >>> batch = {k: np.ones((2, 8), np.int32)
        ...          for k in ("input_ids", "attention_mask", "loss_mask")}
        >>> state, metrics = step(state, frozen, shard_batch(batch, mesh))
        >>> int(state.step)
        1
    """
    step, state_sh, frozen_sh = jit_train_step(mesh, state, frozen, rules, accum)
    return step, jax.device_put(state, state_sh), jax.device_put(frozen, frozen_sh)
