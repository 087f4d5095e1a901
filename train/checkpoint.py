"""Training checkpoints of the trainable partition only (orbax), with checksums.

A checkpoint holds ``state.trainable``, ``state.opt_state``, ``state.step``, the
dropout key and an optional JSON dict (e.g. the data position); never the frozen
base, so it is about the size of the adapter and its optimizer state. orbax stores
the state's pytrees as they are (jpeft's node dataclasses, optax's state tuples) and
restores them onto a template state of the same structure::

    ckpt = Checkpointer("run/checkpoints", max_to_keep=3)
    ckpt.save(state, data={"epoch": 1, "batch": 120})
    state, data = ckpt.restore(template)   # template: a state of the same shapes

Writes are atomic: orbax writes ``<step>.orbax-checkpoint-tmp`` and renames it when
complete, so an interrupted save is ignored; a failed save (a full disk) removes its
partial directory, and :meth:`Checkpointer.remove_partial` removes those a killed
process left. Every array's CRC-32 is saved with it and checked on restore, so a
corrupt file is reported (:class:`CorruptCheckpoint`) instead of resumed from.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import shutil
import threading
import time
import zlib
from collections.abc import Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from jpeft.models.pytree import Tree
from jpeft.train.distributed import is_main, to_host
from jpeft.train.state import TrainState

FORMAT = 2
PARTIAL = ".orbax-checkpoint-tmp"


class CorruptCheckpoint(ValueError):
    """A checkpoint whose files cannot be read or whose arrays fail their checksums."""


class DiskFull(OSError):
    """No space was left on the device while writing (a checkpoint, an adapter).

    Example:
        >>> str(DiskFull("no space left while writing x")), DiskFull("").errno == errno.ENOSPC
        ('no space left while writing x', True)
    """

    def __init__(self, message: str) -> None:
        super().__init__(errno.ENOSPC, message)

    def __str__(self) -> str:
        return self.strerror


def is_disk_full(error: BaseException) -> bool:
    """Whether ``error`` (an OSError, or a writer library's own error) means ENOSPC.

    Example:
        >>> is_disk_full(OSError(errno.ENOSPC, "No space left on device"))
        True
    """
    if isinstance(error, OSError) and error.errno == errno.ENOSPC:
        return True
    return any(s in str(error) for s in ("No space left on device", "StorageFull"))


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
        abstract = isinstance(rng, jax.ShapeDtypeStruct)
        rng = (jax.eval_shape if abstract else lambda f, x: f(x))(jax.random.key_data, rng)
    return {
        "trainable": state.trainable,
        "opt_state": state.opt_state,
        "step": state.step,
        "rng": rng,
    }


def _paths(tree: Tree) -> list[tuple[str, Any]]:
    """``[(path, leaf)]`` with paths like ``trainable/layers/self_attn/q_proj/kernel/...``."""
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return [("/".join(_name(e) for e in path), leaf) for path, leaf in leaves]


def _layout(items: list[tuple[str, Any]]) -> dict[str, list]:
    return {p: [list(np.shape(x)), str(np.dtype(x.dtype))] for p, x in items}


def _checksums(items: list[tuple[str, Any]]) -> dict[str, int]:
    """CRC-32 of each array's bytes (gathered to every process: a collective)."""
    values = to_host([leaf for _, leaf in items])
    crcs = [zlib.crc32(np.ascontiguousarray(v).tobytes()) for v in values]
    return {p: crc for (p, _), crc in zip(items, crcs, strict=True)}


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


class _QuietOrbax(logging.Filter):
    """Drops orbax's log records (its tracebacks precede the error we raise anyway)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "orbax" not in record.pathname


@contextlib.contextmanager
def _quiet_orbax() -> Iterator[None]:
    logger, quiet = logging.getLogger("absl"), _QuietOrbax()
    logger.addFilter(quiet)
    try:
        yield
    finally:
        logger.removeFilter(quiet)


def _join_threads_started_since(before: set[threading.Thread], timeout: float) -> None:
    """Wait up to ``timeout`` seconds for the threads not in ``before`` to end, including
    those still starting (which ``Thread.join`` refuses)."""
    deadline = time.monotonic() + timeout
    while pending := set(threading.enumerate()) - before - {threading.current_thread()}:
        if time.monotonic() > deadline:
            return
        for thread in pending:
            try:
                thread.join(timeout=max(0.0, deadline - time.monotonic()))
            except RuntimeError:  # not started yet
                time.sleep(0.01)


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
        self._options = ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep, create=True, enable_async_checkpointing=async_save
        )
        self._open()

    def _open(self) -> None:
        if os.path.isdir(self.directory):
            for name in sorted(os.listdir(self.directory)):
                path = os.path.join(self.directory, name)
                if os.path.islink(path):  # orbax's clean-up would delete through it
                    raise ValueError(
                        f"{path} is a symbolic link (to {os.readlink(path)!r}); checkpoints "
                        "are not read or deleted through links: remove the link"
                    )
        self._manager = ocp.CheckpointManager(self.directory, options=self._options)

    def all_steps(self) -> list[int]:
        """Steps of the complete checkpoints, oldest first."""
        return sorted(self._manager.all_steps())

    def latest_step(self) -> int | None:
        """The newest complete checkpoint's step, or None when there is none."""
        return self._manager.latest_step()

    def path(self, step: int) -> str:
        """The directory of checkpoint ``step``."""
        return os.path.join(self.directory, str(step))

    def save(self, state: TrainState, data: dict[str, Any] | None = None) -> bool:
        """Write a checkpoint at ``state.step``; False if that step is already saved.

        ``data`` is any JSON-serializable dict (e.g. the data loader position). A failed
        write removes its partial directory and raises :class:`DiskFull` when the device
        is full, else OSError naming the checkpoint.
        """
        try:
            json.dumps(data)
        except (TypeError, ValueError) as err:
            raise ValueError(f"checkpoint data must be JSON-serializable: {err}") from None
        step = int(state.step)
        if step in self.all_steps():
            return False
        tree = _saved_tree(state)
        items = _paths(tree)
        impl = str(jax.random.key_impl(state.rng)) if _is_key(state.rng) else None
        meta = {"format": FORMAT, "step": step, "layout": _layout(items), "rng_impl": impl}
        meta["checksums"], meta["data"] = _checksums(items), data
        args = ocp.args.Composite(arrays=ocp.args.StandardSave(tree), meta=ocp.args.JsonSave(meta))
        threads = set(threading.enumerate())
        try:
            with _quiet_orbax():
                saved = bool(self._manager.save(step, args=args))
                self._manager.wait_until_finished()
        except Exception as err:
            self._failed_save(step, err, threads)
        return saved

    def _failed_save(self, step: int, err: Exception, threads: set[threading.Thread]) -> None:
        with _quiet_orbax():
            # the failed save's other writers still run on orbax's threads: let them end
            # before closing the manager, whose executors they use
            _join_threads_started_since(threads, timeout=60)
            with contextlib.suppress(Exception):  # close() may raise the save's error again
                self._manager.close()
            # tensorstore's own (C++) writers may still finish a chunk, late on a loaded
            # machine: remove the partial directory until it has stayed away for two
            # seconds (30 s at most)
            quiet = 0
            for _ in range(300):
                quiet = 0 if self.remove_partial() else quiet + 1
                if quiet == 20:
                    break
                time.sleep(0.1)
        self._open()
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        if is_disk_full(err):
            raise DiskFull(
                f"no space left on the device while writing checkpoint {step} in "
                f"{self.directory} (its partial directory was removed)",
            ) from err
        raise OSError(f"could not write checkpoint {step} in {self.directory}: {first}") from err

    def remove_partial(self) -> list[str]:
        """Remove the partial ``<step>.orbax-checkpoint-tmp*`` directories of failed or
        killed saves (main process only); returns their paths.

        Never call it while another process may be saving into the same directory.
        """
        removed = []
        if is_main() and os.path.isdir(self.directory):
            for name in sorted(os.listdir(self.directory)):
                path = os.path.join(self.directory, name)
                if PARTIAL in name and not os.path.islink(path):
                    shutil.rmtree(path, ignore_errors=True)
                    removed.append(path)
        return removed

    def delete(self, step: int) -> None:
        """Delete checkpoint ``step`` (e.g. one a divergence showed to be bad)."""
        self._manager.delete(step)

    def data(self, step: int) -> dict[str, Any] | None:
        """The JSON ``data`` saved with checkpoint ``step``, without reading its arrays."""
        return self._meta(step)["data"]

    def _meta(self, step: int) -> dict[str, Any]:
        return self._read(step, ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]

    def restore(
        self, template: TrainState, step: int | None = None, *, fall_back: bool = False
    ) -> tuple[TrainState, dict[str, Any] | None]:
        """``(state, data)`` from checkpoint ``step`` (default: the newest).

        ``template`` is a state of the same structure (e.g. a fresh
        ``TrainState.create`` or its ``jax.eval_shape``), placed on the shardings
        the restored arrays should have. A checkpoint whose arrays differ from the
        template's (another rank, other targets) raises ValueError naming them; one whose
        files are unreadable or whose arrays fail their checksums raises
        :class:`CorruptCheckpoint` naming it, unless ``fall_back`` (newest only): then the
        newest good older checkpoint is restored and the corrupt newer ones are set aside
        as ``<step>.corrupt``.
        """
        if step is None and fall_back:
            return self._restore_newest_good(template)
        step = self.latest_step() if step is None else step
        if step is None or step not in self.all_steps():
            raise FileNotFoundError(
                f"no checkpoint {'' if step is None else step} in {self.directory} "
                f"(complete steps: {self.all_steps()})"
            )
        meta = self._meta(step)
        if meta.get("format") != FORMAT:
            raise ValueError(
                f"checkpoint {self.path(step)} has format {meta.get('format')}, written by "
                f"another jpeft version (this one reads format {FORMAT})"
            )
        items = _paths(_saved_tree(template))
        problems = layout_diff(meta["layout"], _layout(items))
        if problems:
            raise ValueError(
                f"checkpoint {self.path(step)} does not match the training state:\n  "
                + "\n  ".join(problems)
            )
        abstract = jax.tree.map(_abstract, _saved_tree(template))
        tree = self._read(step, ocp.args.Composite(arrays=ocp.args.StandardRestore(abstract)))
        tree = tree["arrays"]
        self._verify(step, meta, _paths(tree))
        rng = tree["rng"]
        if _is_key(template.rng):
            rng = jax.random.wrap_key_data(rng, impl=meta["rng_impl"])
        state = template.replace(
            step=tree["step"], trainable=tree["trainable"], opt_state=tree["opt_state"], rng=rng
        )
        return state, meta["data"]

    def _restore_newest_good(self, template: TrainState) -> tuple[TrainState, Any]:
        for step in reversed(self.all_steps()):
            try:
                return self.restore(template, step)
            except CorruptCheckpoint as err:
                logging.getLogger(__name__).warning("%s; trying an older checkpoint", err)
                if is_main():
                    os.replace(self.path(step), self.path(step) + ".corrupt")
                self._manager.close()
                self._open()
        raise FileNotFoundError(f"no good checkpoint in {self.directory}")

    def _verify(self, step: int, meta: dict[str, Any], items: list[tuple[str, Any]]) -> None:
        expected = meta.get("checksums")
        if expected is None:
            raise CorruptCheckpoint(f"checkpoint {self.path(step)} has no checksums")
        bad = [p for p, crc in _checksums(items).items() if expected.get(p) != crc]
        if bad:
            raise CorruptCheckpoint(
                f"checkpoint {self.path(step)} is corrupt: the data of {', '.join(bad[:4])}"
                f"{' ...' if len(bad) > 4 else ''} in {os.path.join(self.path(step), 'arrays')} "
                "does not match the checksums saved with it"
            )

    def _read(self, step: int, args: ocp.args.Composite) -> Any:
        try:
            with _quiet_orbax():
                return self._manager.restore(step, args=args)
        except Exception as err:
            first = str(err).splitlines()[0] if str(err) else type(err).__name__
            raise CorruptCheckpoint(
                f"checkpoint {self.path(step)} could not be read (corrupt?): {first}"
            ) from err

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
