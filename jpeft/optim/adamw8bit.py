"""AdamW with 8-bit optimizer states, following bitsandbytes' ``AdamW8bit``.

Both Adam moments are stored blockwise-quantized with the dynamic 8-bit map
(:mod:`jpeft.quant.dynamic`): the first moment with the signed map, the second with the
unsigned map, ``blocksize`` values per float32 absmax. Each step dequantizes the moments,
updates them in float32, computes the Adam direction from those float32 moments and only then
re-quantizes them with fresh per-block absmax, exactly as bitsandbytes does.

bitsandbytes sees one tensor per layer; jpeft stacks the layers of a tensor along leading
``layers`` axes (``[L, ...]``). Both decisions bitsandbytes makes per tensor are made here per
layer slice: a slice with fewer than ``min_8bit_size`` elements keeps float32 moments, and
quantization blocks never cross from one layer to the next (each layer's last block may be
partial). A quantized moment keeps the parameter's own layout (uint8 codes of the
parameter's shape, absmax laid out over the parameter's leading dimensions where the blocks
allow it) so it shards like the parameter. It takes about 1.016 bytes per element instead of 4.

The state is a pytree of arrays, so it can be jitted, donated, sharded and checkpointed.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from jpeft.quant.dynamic import dequantize_blockwise, dynamic_map, quantize_blockwise
from jpeft.sharding import is_axes, logical_axes

Tree = Any
LayerDims = Tree | Callable[[Tree], Tree]


def block_grid(shape: tuple[int, ...], layer_dims: int, blocksize: int) -> tuple[int, ...] | None:
    """Blocks of each layer slice laid out over the slice's leading dims, or None.

    The row-major blocks of a ``shape[layer_dims:]`` slice form a grid over its leading
    dimensions when the trailing dimensions fill whole blocks: ``[2048, 16]`` in blocks of 256
    is the grid ``(128,)`` (16 rows per block), ``[16, 2048]`` is ``(16, 8)``. Returns None when
    blocks straddle rows unevenly or the slice ends in a partial block.

    Example:
        >>> block_grid((4, 2048, 16), 1, 256), block_grid((16, 2048), 0, 256)
        ((128,), (16, 8))
        >>> block_grid((50, 30), 0, 256) is None
        True
    """
    dims, rest = list(shape[layer_dims:]), blocksize
    while rest > 1 and dims:
        if rest % dims[-1] == 0:
            rest //= dims.pop()
        elif dims[-1] % rest == 0:
            dims[-1] //= rest
            rest = 1
        else:
            return None
    return tuple(dims) if rest == 1 else None


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class QuantizedMoment:
    """One blockwise 8-bit moment of a parameter of shape ``S`` with ``layer_dims`` stacked axes.

    Attributes:
        codes: uint8 ``S``, one codebook index per element (the parameter's layout).
        absmax: float32 per-block absolute maxima: ``[*S[:layer_dims], *grid]`` when the
            blocks form a :func:`block_grid` (then absmax dimension ``i`` follows parameter
            dimension ``i``), else ``[*S[:layer_dims], blocks per layer]``.
        layer_dims: number of leading stacked-layer axes (static).
        blocksize: values per block (static).
    """

    codes: jax.Array
    absmax: jax.Array
    layer_dims: int = dataclasses.field(metadata={"static": True})
    blocksize: int = dataclasses.field(metadata={"static": True})

    @property
    def grid(self) -> tuple[int, ...] | None:
        """The block grid of one layer slice (see :func:`block_grid`), or None."""
        return block_grid(tuple(self.codes.shape), self.layer_dims, self.blocksize)

    @property
    def aligned_dims(self) -> int:
        """Leading absmax dimensions that follow the parameter's (for sharding).

        Example:
            >>> m = init_moment(jnp.zeros((4, 2048, 16)), 1, 256)
            >>> m.absmax.shape, m.aligned_dims
            ((4, 128), 2)
        """
        grid = self.grid
        return self.layer_dims + len(grid) if grid is not None else self.layer_dims


def init_moment(param: jax.Array, layer_dims: int, blocksize: int) -> QuantizedMoment:
    """An all-zero :class:`QuantizedMoment` for ``param`` ``[*layers, ...]``.

    Example:
        >>> m = init_moment(jnp.zeros((2, 50, 30)), 1, 256)
        >>> m.codes.shape, m.absmax.shape
        ((2, 50, 30), (2, 6))
    """
    shape = tuple(param.shape)
    grid = block_grid(shape, layer_dims, blocksize)
    if grid is None:
        grid = (math.ceil(math.prod(shape[layer_dims:]) / blocksize),)
    return QuantizedMoment(
        codes=jnp.zeros(shape, jnp.uint8),
        absmax=jnp.zeros((*shape[:layer_dims], *grid), jnp.float32),
        layer_dims=layer_dims,
        blocksize=blocksize,
    )


def _batched(fn: Callable, dims: int) -> Callable:
    for _ in range(dims):
        fn = jax.vmap(fn)
    return fn


def quantize_moment(x: jax.Array, code: jax.Array, like: QuantizedMoment) -> QuantizedMoment:
    """``x`` (float32, the parameter's shape) quantized into the layout of ``like``.

    Each block is quantized by :func:`jpeft.quant.dynamic.quantize_blockwise`, vmapped over
    the block grid so that the computation keeps the parameter's sharding.
    """
    shape, bs = tuple(x.shape), like.blocksize
    grid = like.grid
    lead = shape[: like.layer_dims]
    if grid is not None:
        blocks = x.reshape(*lead, *grid, bs)
        one = lambda row: quantize_blockwise(row, code, bs)
        codes, absmax = _batched(one, blocks.ndim - 1)(blocks)
        return dataclasses.replace(like, codes=codes.reshape(shape), absmax=absmax[..., 0])
    rows = x.reshape(*lead, -1)
    one = lambda row: quantize_blockwise(row, code, bs)
    codes, absmax = _batched(one, len(lead))(rows)
    return dataclasses.replace(like, codes=codes.reshape(shape), absmax=absmax)


def dequantize_moment(moment: QuantizedMoment, code: jax.Array) -> jax.Array:
    """The float32 values of ``moment`` (inverse of :func:`quantize_moment`)."""
    shape, bs = tuple(moment.codes.shape), moment.blocksize
    grid = moment.grid
    lead = shape[: moment.layer_dims]
    if grid is not None:
        codes = moment.codes.reshape(*lead, *grid, bs)
        one = lambda c, a: dequantize_blockwise(c, a, code, bs, (bs,))
        return _batched(one, codes.ndim - 1)(codes, moment.absmax[..., None]).reshape(shape)
    codes = moment.codes.reshape(*lead, -1)
    size = codes.shape[-1]
    one = lambda c, a: dequantize_blockwise(c, a, code, bs, (size,))
    return _batched(one, len(lead))(codes, moment.absmax).reshape(shape)


def stacked_layer_dims(params: Tree) -> Tree:
    """The number of leading ``layers`` axes of every array of a jpeft params tree.

    Read from :func:`jpeft.sharding.logical_axes`; arrays outside the layer stack get 0.

    Example:
        >>> import jax.numpy as jnp
        >>> stacked_layer_dims({"layers": {"mlp": {"up_proj": {"kernel": jnp.zeros((2, 4, 8))}}},
        ...                     "w": jnp.zeros((4, 4))})
        {'layers': {'mlp': {'up_proj': {'kernel': 1}}}, 'w': 0}
    """

    def leading(axes: tuple[str | None, ...]) -> int:
        count = 0
        while count < len(axes) and axes[count] == "layers":
            count += 1
        return count

    # Leaves that optax.masked replaced by a MaskedNode have no axes (as in a split part).
    masked = lambda x: isinstance(x, optax.MaskedNode)
    unmasked = jax.tree.map(lambda x: None if masked(x) else x, params, is_leaf=masked)
    axes = dict(jax.tree_util.tree_leaves_with_path(logical_axes(unmasked), is_leaf=is_axes))
    return jax.tree_util.tree_map_with_path(lambda path, _: leading(axes[path]), params)


class ScaleByAdam8bitState(NamedTuple):
    """State of :func:`scale_by_adam_8bit`.

    ``mu`` and ``nu`` mirror the parameter tree; each leaf is a float32 array of the
    parameter's shape (small layer slices) or a :class:`QuantizedMoment`.
    """

    count: jax.Array
    mu: Any
    nu: Any


def _check_hyperparameters(
    b1: float, b2: float, eps: float, blocksize: int, min_8bit_size: int
) -> None:
    for name, beta in (("b1", b1), ("b2", b2)):
        if not 0.0 <= beta < 1.0:
            raise ValueError(f"{name}: expected a value in [0, 1), found {beta}")
    if eps < 0.0:
        raise ValueError(f"eps: expected a value >= 0, found {eps}")
    if not isinstance(blocksize, int) or blocksize <= 0:
        raise ValueError(f"blocksize: expected a positive int, found {blocksize!r}")
    if not isinstance(min_8bit_size, int) or min_8bit_size < 0:
        raise ValueError(f"min_8bit_size: expected an int >= 0, found {min_8bit_size!r}")


def scale_by_adam_8bit(
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    blocksize: int = 256,
    min_8bit_size: int = 4096,
    layer_dims: LayerDims = stacked_layer_dims,
) -> optax.GradientTransformation:
    """Adam scaling (``m_hat / (sqrt(v_hat) + eps)``) with blockwise 8-bit moments.

    Args:
        b1: decay of the first moment.
        b2: decay of the second moment.
        eps: added to ``sqrt(v_hat)``.
        blocksize: values per quantization block (bitsandbytes uses 256).
        min_8bit_size: layer slices with fewer elements keep float32 moments
            (bitsandbytes' rule for each of its per-layer tensors).
        layer_dims: leading stacked-layer axes of each parameter: a tree of ints shaped
            like the params, or a function of the params returning one (default:
            :func:`stacked_layer_dims`, the ``layers`` axes of jpeft's params layout).

    Example:
        >>> import jax.numpy as jnp
        >>> tx = scale_by_adam_8bit(min_8bit_size=8)
        >>> params = {"w": jnp.ones((4, 4)), "b": jnp.ones(3)}
        >>> state = tx.init(params)
        >>> type(state.mu["w"]).__name__, state.mu["b"].dtype
        ('QuantizedMoment', dtype('float32'))
        >>> updates, state = tx.update(params, state)
        >>> round(float(updates["w"][0, 0]), 4)
        1.0
    """
    _check_hyperparameters(b1, b2, eps, blocksize, min_8bit_size)
    signed = jnp.asarray(dynamic_map(signed=True))
    unsigned = jnp.asarray(dynamic_map(signed=False))

    def init_leaf(param: jax.Array, dims: int) -> jax.Array | QuantizedMoment:
        if math.prod(param.shape[dims:]) < min_8bit_size:
            return jnp.zeros(param.shape, jnp.float32)
        return init_moment(param, dims, blocksize)

    def init_fn(params: optax.Params) -> ScaleByAdam8bitState:
        dims = layer_dims(params) if callable(layer_dims) else layer_dims
        return ScaleByAdam8bitState(
            count=jnp.zeros([], jnp.int32),
            mu=jax.tree.map(init_leaf, params, dims),
            nu=jax.tree.map(init_leaf, params, dims),
        )

    def load(moment: jax.Array | QuantizedMoment, code: jax.Array) -> jax.Array:
        if isinstance(moment, QuantizedMoment):
            return dequantize_moment(moment, code)
        return moment

    def store(
        moment: jax.Array, code: jax.Array, like: jax.Array | QuantizedMoment
    ) -> jax.Array | QuantizedMoment:
        if isinstance(like, QuantizedMoment):
            return quantize_moment(moment, code, like)
        return moment

    def update_fn(
        updates: optax.Updates, state: ScaleByAdam8bitState, params: optax.Params | None = None
    ) -> tuple[optax.Updates, ScaleByAdam8bitState]:
        del params
        count = optax.safe_increment(state.count)
        step = count.astype(jnp.float32)
        correction1 = 1.0 - jnp.float32(b1) ** step
        correction2 = jnp.sqrt(1.0 - jnp.float32(b2) ** step)

        grads, treedef = jax.tree.flatten(updates)
        mus = treedef.flatten_up_to(state.mu)
        nus = treedef.flatten_up_to(state.nu)
        new_updates, new_mus, new_nus = [], [], []
        for grad, mu, nu in zip(grads, mus, nus, strict=True):
            g = grad.astype(jnp.float32)
            m = jnp.float32(b1) * load(mu, signed) + jnp.float32(1.0 - b1) * g
            v = jnp.float32(b2) * load(nu, unsigned) + jnp.float32(1.0 - b2) * g * g
            direction = (m / correction1) / (jnp.sqrt(v) / correction2 + jnp.float32(eps))
            new_updates.append(direction.astype(grad.dtype))
            new_mus.append(store(m, signed, mu))
            new_nus.append(store(v, unsigned, nu))
        return treedef.unflatten(new_updates), ScaleByAdam8bitState(
            count=count, mu=treedef.unflatten(new_mus), nu=treedef.unflatten(new_nus)
        )

    return optax.GradientTransformation(init_fn, update_fn)


def adamw_8bit(
    learning_rate: optax.ScalarOrSchedule,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 0.01,
    blocksize: int = 256,
    min_8bit_size: int = 4096,
    mask: Any = None,
    layer_dims: LayerDims = stacked_layer_dims,
) -> optax.GradientTransformation:
    """AdamW with bitsandbytes ``AdamW8bit`` semantics (8-bit blockwise moments).

    Same structure as :func:`optax.adamw`: :func:`scale_by_adam_8bit`, then decoupled weight
    decay (``mask`` selects the decayed leaves, as in optax), then the learning rate, which may
    be a schedule.

    Example:
        >>> import jax, jax.numpy as jnp, optax
        >>> params = {"w": jnp.ones((64, 128))}
        >>> tx = adamw_8bit(1e-3)
        >>> state = tx.init(params)
        >>> grads = jax.tree.map(jnp.ones_like, params)
        >>> updates, state = jax.jit(tx.update)(grads, state, params)
        >>> params = optax.apply_updates(params, updates)
        >>> round(float(params["w"][0, 0]), 6)  # 1 - 1e-3 * (1 + 0.01 * 1)
        0.99899
    """
    return optax.chain(
        scale_by_adam_8bit(b1, b2, eps, blocksize, min_8bit_size, layer_dims),
        optax.add_decayed_weights(weight_decay, mask),
        optax.scale_by_learning_rate(learning_rate),
    )
