"""The 4-bit kernels under a device mesh: one kernel call per shard.

XLA cannot split a Pallas kernel (a custom call) across devices; left alone, its SPMD
partitioner would gather every operand and run the whole product on every device. So
each kernel is wrapped in :func:`jax.experimental.custom_partitioning` with this rule
(Shardy factors ``m k, n h, n b, c, -> m n``):

* the rows of ``x`` (``m``, the batch) keep their sharding;
* the weight's rows (``n``, the base's output axis: ``packed [N, K / 2]`` and its scales
  ``[N, K / blocksize]``) keep theirs, minus any mesh axis that already shards ``m``
  (and gathered if a shard would hold fewer than 16 rows, or a number the tiles do not
  divide);
* the contraction axis (``k``: ``x``'s columns, the codes' and scales' columns) is
  gathered, so an FSDP-sharded weight is all-gathered in its 4-bit form; the nested
  absmax and offset are replicated (a few values per layer).

The forward result ``[M, N]`` keeps the ``m`` and ``n`` shardings. The input gradient
``dy @ W^T`` sums the products of its ``n`` shards (a ``psum`` over those mesh axes) and
keeps ``m``. Each shard's kernel gets the index of its first weight row, which the
double-quantized scales need (:func:`jpeft.quant.kernels.tiles.weight_operands`). On one
device (or without a mesh) the kernel is called directly.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import jax
from jax.experimental.custom_partitioning import custom_partitioning
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from jpeft.quant.kernels.decode import MAX_M, decode
from jpeft.quant.kernels.gemm import gemm
from jpeft.quant.kernels.tiles import MIN_TILE
from jpeft.quant.kernels.vjp import input_grad

if TYPE_CHECKING:
    from jpeft.quant.node import QuantizedWeight


def _product(
    x: jax.Array, w: QuantizedWeight, row_base: Any, tables: tuple[jax.Array, ...], interpret: bool
) -> jax.Array:
    kernel = decode if x.shape[0] <= MAX_M else gemm
    return kernel(x, w, row_base, tables, interpret=interpret)


def _input_grad(
    dy: jax.Array, w: QuantizedWeight, row_base: Any, tables: tuple[jax.Array, ...], interpret: bool
) -> jax.Array:
    return input_grad(dy, w, row_base, tables, interpret=interpret)


def _axes(entry: Any) -> tuple[str, ...]:
    """The mesh axes of one PartitionSpec entry, as a tuple."""
    if entry is None:
        return ()
    return tuple(entry) if isinstance(entry, tuple) else (entry,)


def _spec_entry(axes: tuple[str, ...]) -> Any:
    return None if not axes else axes[0] if len(axes) == 1 else axes


def _split(arg_shapes: Any) -> tuple[Any, tuple[str, ...], tuple[str, ...]]:
    """``(mesh, m axes, n axes)`` from the shardings the partitioner proposes."""
    rows, w, _ = arg_shapes
    if not isinstance(rows.sharding, NamedSharding):
        return None, (), ()
    m = _axes(rows.sharding.spec[0] if len(rows.sharding.spec) else None)
    weight = w.packed.sharding
    spec = weight.spec if isinstance(weight, NamedSharding) else P()
    n = tuple(a for a in _axes(spec[0] if len(spec) else None) if a not in m)
    mesh = rows.sharding.mesh
    if (w.packed.shape[0] // math.prod(mesh.shape[a] for a in n)) % MIN_TILE:
        n = ()  # shards too narrow for the kernels' tiles: gather the rows
    return mesh, m, n


def _weight_shardings(mesh: Any, w: Any, n: tuple[str, ...]) -> Any:
    """Row-sharded ``packed`` and scales (``n``), everything else replicated."""
    rows = NamedSharding(mesh, P(_spec_entry(n), None))
    replicated = NamedSharding(mesh, P())
    return jax.tree.map(lambda a: rows if a.ndim == 2 else replicated, w)


def _row_base(mesh: Any, n: tuple[str, ...], rows: int) -> jax.Array:
    """The first weight row of this shard: its index along the ``n`` mesh axes times rows."""
    index = 0
    for axis in n:
        index = index * mesh.shape[axis] + jax.lax.axis_index(axis)
    return index * rows


def _partitioned(
    local: Callable[..., jax.Array], reduce_n: bool, rule: Callable[..., Any]
) -> Callable[..., jax.Array]:
    """``local(a, w, row_base, tables, interpret)`` as a custom-partitioned
    ``f(a, w, tables, interpret)``.

    ``a`` is ``x [M, K]`` (``reduce_n`` False: the result keeps ``n``) or ``dy [M, N]``
    (``reduce_n`` True: the shards' results are summed over ``n``).
    """

    @functools.partial(custom_partitioning, static_argnums=(3,))
    def op(a: jax.Array, w: QuantizedWeight, tables: tuple[jax.Array, ...], interpret: bool):
        return local(a, w, 0, tables, interpret)

    def shardings(mesh, arg_shapes, m, n):
        a_spec = P(_spec_entry(m), _spec_entry(n) if reduce_n else None)
        out_spec = P(_spec_entry(m), None if reduce_n else _spec_entry(n))
        replicated = NamedSharding(mesh, P())
        tables = tuple(replicated for _ in arg_shapes[2])
        args = (NamedSharding(mesh, a_spec), _weight_shardings(mesh, arg_shapes[1], n), tables)
        return NamedSharding(mesh, out_spec), args

    def infer(interpret, mesh, arg_shapes, result_shape):
        found, m, n = _split(arg_shapes)
        if found is None:
            return NamedSharding(mesh, P())
        return shardings(found, arg_shapes, m, n)[0]

    def partition(interpret, mesh, arg_shapes, result_shape):
        found, m, n = _split(arg_shapes)
        if found is None:  # no named mesh to reason about: run it whole on every device
            replicated = NamedSharding(mesh, P())
            args = jax.tree.map(lambda _: replicated, arg_shapes)
            return mesh, lambda a, w, t: local(a, w, 0, t, interpret), replicated, args
        out, args = shardings(found, arg_shapes, m, n)

        def lower(a: jax.Array, w: QuantizedWeight, tables: tuple[jax.Array, ...]) -> jax.Array:
            row_base = _row_base(found, n, w.packed.shape[0])
            result = local(a, w, row_base, tables, interpret)
            return jax.lax.psum(result, n) if reduce_n and n else result

        return found, lower, out, args

    op.def_partition(
        partition=partition,
        infer_sharding_from_operands=infer,
        sharding_rule=rule,
    )
    return op


# Factors: m rows of x / dy, k columns of x (in), n weight rows (out), h packed columns,
# b absmax columns, c nested absmax, d and t the code tables; the offset is a scalar.
# Weights without double quantization pass ``packed``, ``absmax`` and one table.
def _rule(result: str, first: str) -> Callable[..., tuple[str, dict[str, Any]]]:
    def rule(interpret, mesh, operand_types, result_types) -> tuple[str, dict[str, Any]]:
        if len(operand_types) == 7:  # a, packed, codes, nested, offset, dynamic map, table
            operands, gathered = f"{first}, n h, n b, c, , d, t", ("k", "h", "b", "c", "d", "t")
        else:  # a, packed, absmax, table
            operands, gathered = f"{first}, n h, n b, t", ("k", "h", "b", "t")
        text = f"{operands} -> {result}"
        order = text.replace(",", " ").split()  # Shardy wants them in order of appearance
        gathered = tuple(sorted(gathered, key=order.index))
        return text, {"need_replication_factors": gathered}

    return rule


product = _partitioned(_product, reduce_n=False, rule=_rule("m n", "m k"))
input_gradient = _partitioned(_input_grad, reduce_n=True, rule=_rule("m k", "m n"))
