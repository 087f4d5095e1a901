"""Multi-process (multi-host) runs: start-up, each process's share of a batch, host copies.

Every process runs the same program on the same global batch order; each feeds only
its own rows (:func:`local_rows`) and ``jpeft.train.sharding.shard_batch`` assembles the
global arrays. On CPU, processes talk through gloo collectives (JAX's default CPU
implementation), so two processes on one machine are a real multi-host test::

    jpeft train --coordinator localhost:1234 --num-processes 2 --process-id 0 &
    jpeft train --coordinator localhost:1234 --num-processes 2 --process-id 1
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils

from jpeft.models.pytree import Tree


def initialize(coordinator: str, num_processes: int, process_id: int) -> None:
    """``jax.distributed.initialize`` with a clear error for bad arguments.

    Must run before anything touches a JAX device.

    Example:
        >>> initialize("10.0.0.1:1234", num_processes=4, process_id=0)  # doctest: +SKIP
    """
    host, sep, port = coordinator.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ValueError(f"--coordinator must be host:port, found {coordinator!r}")
    if num_processes < 1 or not 0 <= process_id < num_processes:
        raise ValueError(
            f"--process-id must be in [0, {num_processes}) with --num-processes >= 1, "
            f"found process id {process_id} of {num_processes}"
        )
    jax.distributed.initialize(coordinator, num_processes=num_processes, process_id=process_id)


def is_main() -> bool:
    """True on the process that prints, writes files and shows the progress bar.

    Example:
        >>> is_main()  # a single-process run
        True
    """
    return jax.process_index() == 0


def local_rows(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """This process's contiguous share of the rows of a global host batch.

    Example:
        >>> local_rows({"x": np.arange(4)})["x"].tolist()  # one process: all rows
        [0, 1, 2, 3]
    """
    n, index = jax.process_count(), jax.process_index()
    out = {}
    for key, value in batch.items():
        rows = value.shape[0]
        if rows % n:
            raise ValueError(f"batch[{key!r}] has {rows} rows, not divisible by {n} processes")
        share = rows // n
        out[key] = value[index * share : (index + 1) * share]
    return out


def to_host(tree: Tree) -> Tree:
    """Every array of ``tree`` as a full numpy array on every process.

    Arrays spread over several processes are gathered (a collective: every process
    must call this together).

    Example:
        >>> to_host({"a": jax.numpy.ones(2)})["a"].tolist()
        [1.0, 1.0]
    """

    def fetch(x: Any) -> Any:
        if not isinstance(x, jax.Array):
            return x
        if x.is_fully_addressable or x.is_fully_replicated:
            return np.asarray(x)
        return np.asarray(multihost_utils.process_allgather(x, tiled=True))

    return jax.tree.map(fetch, tree)


def sync(name: str) -> None:
    """A barrier across processes (no-op with one process).

    Example:
        >>> sync("saved")
    """
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)
