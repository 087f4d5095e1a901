"""Training checkpoints of the trainable partition only (orbax).

A checkpoint holds ``state.trainable``, ``state.opt_state``, ``state.step``, the
dropout key and an optional JSON dict (e.g. the data position); never the
frozen base, so it is about the size of the adapter and its optimizer state.
Writes are atomic: orbax writes ``<step>.orbax-checkpoint-tmp`` and renames it
when complete, so an interrupted save is ignored and the previous checkpoint is
used. PEFT nodes (dataclasses with None fields) are stored as plain nested dicts
of arrays; restore rebuilds the tree from a template state::

    ckpt = Checkpointer("run/checkpoints", max_to_keep=3)
    ckpt.save(state, data={"epoch": 1, "batch": 120})
    state, data = ckpt.restore(template)   # template: a state of the same shapes
"""

from __future__ import annotations

import json
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from jpeft.models.pytree import Tree
from jpeft.train.state import TrainState

FORMAT = 1


def _name(entry: Any) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(entry, attr):
            return str(getattr(entry, attr))
    raise TypeError(f"unsupported pytree path entry {entry!r}")


def _is_key(x: Any) -> bool:
    return jnp.issubdtype(x.dtype, jax.dtypes.prng_key)


def _saved_tree(state: TrainState) -> Tree:
    rng = state.rng
    if _is_key(rng):
        rng = (
            jax.eval_shape(jax.random.key_data, rng)
            if _is_abstract(rng)
            else jax.random.key_data(rng)
        )
    return {
        "trainable": state.trainable,
        "opt_state": state.opt_state,
        "step": state.step,
        "rng": rng,
    }


def _is_abstract(x: Any) -> bool:
    return isinstance(x, jax.ShapeDtypeStruct)


def _flat(tree: Tree) -> tuple[list[tuple[tuple[str, ...], Any]], Any]:
    leaves, treedef = jax.tree_util.tree_flatten_with_path(tree)
    return [(tuple(_name(e) for e in path), leaf) for path, leaf in leaves], treedef


def _nest(items: list[tuple[tuple[str, ...], Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for path, leaf in items:
        node = out
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = leaf
    return out


def _pick(nested: dict[str, Any], path: tuple[str, ...]) -> Any:
    for key in path:
        nested = nested[key]
    return nested


def _layout(items: list[tuple[tuple[str, ...], Any]]) -> dict[str, list]:
    return {"/".join(p): [list(np.shape(x)), str(np.dtype(x.dtype))] for p, x in items}


def _abstract(leaf: Any) -> jax.ShapeDtypeStruct:
    sharding = getattr(leaf, "sharding", None)
    if sharding is None:
        sharding = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    return jax.ShapeDtypeStruct(np.shape(leaf), leaf.dtype, sharding=sharding)


def layout_diff(saved: dict[str, list], expected: dict[str, list], limit: int = 12) -> list[str]:
    """Human-readable differences between two ``{path: [shape, dtype]}`` layouts.

    Differences in ``trainable/`` are listed first; the optimizer-state entries that
    merely follow them are summarized.

    Example:
        >>> layout_diff({"a": [[2], "float32"]}, {"a": [[3], "float32"], "b": [[1], "int32"]})
        ['missing from the checkpoint: b', 'a: checkpoint [2] float32, state [3] float32']
    """
    trainable = [p for p in {*saved, *expected} if p.startswith("trainable/")]
    keys = trainable if any(saved.get(p) != expected.get(p) for p in trainable) else None
    sub = (lambda d: {k: d[k] for k in keys if k in d}) if keys else (lambda d: d)
    saved, expected_sub = sub(saved), sub(expected)
    missing = sorted(set(expected_sub) - set(saved))
    extra = sorted(set(saved) - set(expected_sub))
    problems = []
    if missing:
        problems.append(f"missing from the checkpoint: {', '.join(missing[:limit])}")
    if extra:
        problems.append(f"in the checkpoint but not in the state: {', '.join(extra[:limit])}")
    changed = [p for p in sorted(set(saved) & set(expected_sub)) if saved[p] != expected_sub[p]]
    for path in changed[:limit]:
        (s_shape, s_dtype), (e_shape, e_dtype) = saved[path], expected_sub[path]
        problems.append(f"{path}: checkpoint {s_shape} {s_dtype}, state {e_shape} {e_dtype}")
    if len(changed) > limit:
        problems.append(f"... and {len(changed) - limit} more")
    if keys and problems:
        problems.append("(the optimizer state differs accordingly)")
    return problems


class Checkpointer:
    """Save and restore :class:`TrainState` checkpoints in ``directory``, keeping the newest N.

    Example:
        >>> import tempfile, optax
        >>> state = TrainState.create(apply_fn=None, trainable={"w": jnp.ones(2)},
        ...                           tx=optax.sgd(0.1))
        >>> with Checkpointer(tempfile.mkdtemp(), max_to_keep=2) as ckpt:
        ...     _ = ckpt.save(state, data={"batch": 7})
        ...     restored, data = ckpt.restore(state)
        >>> data, int(restored.step)
        ({'batch': 7}, 0)
    """

    def __init__(
        self, directory: str | os.PathLike, *, max_to_keep: int = 3, async_save: bool = False
    ):
        if max_to_keep < 1:
            raise ValueError(f"max_to_keep must be >= 1, got {max_to_keep}")
        self.directory = os.path.abspath(directory)
        options = ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep, create=True, enable_async_checkpointing=async_save
        )
        self._manager = ocp.CheckpointManager(self.directory, options=options)

    def all_steps(self) -> list[int]:
        """Steps of the complete checkpoints, oldest first."""
        return sorted(self._manager.all_steps())

    def latest_step(self) -> int | None:
        """The newest complete checkpoint's step, or None when there is none."""
        return self._manager.latest_step()

    def save(self, state: TrainState, data: dict[str, Any] | None = None) -> bool:
        """Write a checkpoint at ``state.step``; False if that step is already saved.

        ``data`` is any JSON-serializable dict (e.g. the data loader position).
        """
        try:
            json.dumps(data)
        except (TypeError, ValueError) as err:
            raise ValueError(f"checkpoint data must be JSON-serializable: {err}") from None
        step = int(state.step)
        if step in self.all_steps():
            return False
        items, _ = _flat(_saved_tree(state))
        impl = str(jax.random.key_impl(state.rng)) if _is_key(state.rng) else None
        meta = {"format": FORMAT, "step": step, "layout": _layout(items), "rng_impl": impl}
        meta["data"] = data
        args = ocp.args.Composite(
            arrays=ocp.args.StandardSave(_nest(items)), meta=ocp.args.JsonSave(meta)
        )
        return bool(self._manager.save(step, args=args))

    def restore(
        self, template: TrainState, step: int | None = None
    ) -> tuple[TrainState, dict[str, Any] | None]:
        """``(state, data)`` from checkpoint ``step`` (default: the newest).

        ``template`` is a state of the same structure (e.g. a fresh
        ``TrainState.create`` or its ``jax.eval_shape``), placed on the shardings
        the restored arrays should have. A checkpoint whose arrays differ from the
        template's (another rank, other targets) raises ValueError naming them.
        """
        step = self.latest_step() if step is None else step
        if step is None or step not in self.all_steps():
            raise FileNotFoundError(
                f"no checkpoint {'' if step is None else step} in {self.directory} "
                f"(complete steps: {self.all_steps()})"
            )
        meta = self._read(step, ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
        items, treedef = _flat(_saved_tree(template))
        problems = layout_diff(meta["layout"], _layout(items))
        if problems:
            raise ValueError(
                f"checkpoint {step} in {self.directory} does not match the training state:\n  "
                + "\n  ".join(problems)
            )
        abstract = _nest([(path, _abstract(leaf)) for path, leaf in items])
        restored = self._read(step, ocp.args.Composite(arrays=ocp.args.StandardRestore(abstract)))
        restored = restored["arrays"]
        tree = jax.tree_util.tree_unflatten(treedef, [_pick(restored, p) for p, _ in items])
        rng = tree["rng"]
        if _is_key(template.rng):
            rng = jax.random.wrap_key_data(rng, impl=meta["rng_impl"])
        state = template.replace(
            step=tree["step"], trainable=tree["trainable"], opt_state=tree["opt_state"], rng=rng
        )
        return state, meta["data"]

    def _read(self, step: int, args: ocp.args.Composite) -> Any:
        try:
            return self._manager.restore(step, args=args)
        except Exception as err:
            path = os.path.join(self.directory, str(step))
            raise ValueError(f"checkpoint {path} could not be read (corrupt?): {err}") from err

    def wait(self) -> None:
        """Block until an asynchronous save has finished."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        """Finish pending saves and release the manager."""
        self._manager.close()

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
