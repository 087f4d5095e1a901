"""Bottleneck adapters (Houlsby et al. 2019; Pfeiffer et al. 2020).

A small feed-forward ``up(act(down(h)))`` on a sub-layer's output, added back to
it (``h + scaling * up(act(down(h)))``) before the block's residual add. The up
projection starts at zero, so an adapted model starts exactly equal to its base.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Iterator
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np

from jpeft.adapter_files import NUMBER, AdapterConfig, AdapterTensors
from jpeft.method import Method, register
from jpeft.models.config import LlamaConfig
from jpeft.models.context import Context
from jpeft.models.param_spec import module_name
from jpeft.models.pytree import Params
from jpeft.nodes import Node, adapted_layers, layer_mask, node

ACTIVATIONS = {
    "relu": jax.nn.relu,
    "gelu": functools.partial(jax.nn.gelu, approximate=False),
    "silu": jax.nn.silu,
    "tanh": jnp.tanh,
}
PLACEMENTS = {"houlsby": ("attn", "mlp"), "pfeiffer": ("mlp",)}
POSITIONS = ("attn", "mlp")
# node field -> (tensor name in the adapter file, stored transposed as torch's [out, in])
_FILE_NAMES = {
    "down": ("down.weight", True),
    "down_bias": ("down.bias", False),
    "up": ("up.weight", True),
    "up_bias": ("up.bias", False),
}


@node(
    trainable=("down", "down_bias", "up", "up_bias"),
    static=("activation", "scaling", "residual"),
    decay=("down", "up"),
)
class BottleneckAdapter(Node):
    """Per-layer adapter weights with a leading layer axis ``L``.

    ``layer_mask [L]`` (frozen, :func:`jpeft.nodes.layer_mask`) switches the adapter off
    in layers it does not apply to; their slots receive zero gradient and never
    change. The matrices take weight decay, the biases do not.
    """

    down: jax.Array  # [L, hidden, bottleneck]
    down_bias: jax.Array  # [L, bottleneck]
    up: jax.Array  # [L, bottleneck, hidden]
    up_bias: jax.Array  # [L, hidden]
    layer_mask: jax.Array  # [L]
    activation: str
    scaling: float
    residual: bool

    def adapter_output(self, h: jax.Array, ctx: Context, name: str) -> jax.Array:
        """``h + scaling * up(act(down(h)))`` in this layer (``h`` itself where inactive)."""
        dtype = ctx.dtype
        z = h.astype(dtype) @ self.down.astype(dtype) + self.down_bias.astype(dtype)
        z = ACTIVATIONS[self.activation](z)
        delta = (z @ self.up.astype(dtype) + self.up_bias.astype(dtype)) * self.scaling
        mask = self.layer_mask.astype(dtype)
        return h + delta * mask if self.residual else delta * mask + h * (1 - mask)


@register
@dataclasses.dataclass(frozen=True)
class Adapter(Method):
    """Bottleneck adapter tuning: every original parameter frozen.

    Args:
        bottleneck: adapter width; or give ``reduction_factor`` (width = hidden // factor).
        activation: one of ``relu``, ``gelu``, ``silu``, ``tanh``.
        placement: ``"houlsby"`` (after attention and after the MLP), ``"pfeiffer"``
            (after the MLP only), or a tuple of positions from ``("attn", "mlp")``.
        residual: add the adapter output to its input (needed for the exact-base start).
        scaling: multiplies the adapter output.
        layers: layer indices to adapt (default: all).

    Example:
        >>> method = Adapter(bottleneck=16, placement="pfeiffer")
        >>> from jpeft.models import hf, llama
        >>> cfg, base = hf.load_pretrained("assets/tiny-llama")
        >>> params = method.init(jax.random.key(0), base, cfg)
        >>> import jpeft
        >>> sum(leaf.size for leaf in jax.tree.leaves(jpeft.split(params)[0]))  # trainable
        16960
    """

    peft_type: ClassVar[str] = "JPEFT_BOTTLENECK_ADAPTER"

    bottleneck: int | None = None
    reduction_factor: int | None = None
    activation: str = "relu"
    placement: str | tuple[str, ...] = "houlsby"
    residual: bool = True
    scaling: float = 1.0
    layers: tuple[int, ...] | None = None
    init_std: float = 1e-3

    def __post_init__(self) -> None:
        if (self.bottleneck is None) == (self.reduction_factor is None):
            raise ValueError("Adapter: give exactly one of bottleneck and reduction_factor")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"Adapter: activation {self.activation!r}; valid: {list(ACTIVATIONS)}")
        bad = [p for p in self.positions if p not in POSITIONS]
        if bad:
            raise ValueError(f"Adapter: placement positions {bad}; valid: {list(POSITIONS)}")

    @property
    def positions(self) -> tuple[str, ...]:
        """The sub-layers adapted: a subset of ``("attn", "mlp")``."""
        if isinstance(self.placement, str):
            if self.placement not in PLACEMENTS:
                raise ValueError(
                    f"Adapter: placement {self.placement!r}; valid: {list(PLACEMENTS)} "
                    f"or a tuple of {POSITIONS}"
                )
            return PLACEMENTS[self.placement]
        return tuple(self.placement)

    def width(self, cfg: LlamaConfig) -> int:
        """The bottleneck width for ``cfg``."""
        width = self.bottleneck or cfg.hidden_size // self.reduction_factor
        if width <= 0:
            raise ValueError(f"Adapter: bottleneck width {width} must be positive")
        return width

    def adapted_layers(self, cfg: LlamaConfig) -> tuple[int, ...]:
        """The layers that get an adapter."""
        return adapted_layers(self.layers, cfg.num_hidden_layers, "Adapter")

    def init(self, key: jax.Array, params: Params, cfg: LlamaConfig) -> Params:
        n, hidden, width = cfg.num_hidden_layers, cfg.hidden_size, self.width(cfg)
        mask = layer_mask(self.layers, n, "Adapter")
        layers = dict(params["layers"])
        for entry, k in zip(self.entries, jax.random.split(key, 2), strict=False):
            if entry in layers:
                raise ValueError(f"Adapter: params already hold layers/{entry}")
            layers[entry] = BottleneckAdapter(
                down=self.init_std * jax.random.normal(k, (n, hidden, width), jnp.float32),
                down_bias=jnp.zeros((n, width), jnp.float32),
                up=jnp.zeros((n, width, hidden), jnp.float32),
                up_bias=jnp.zeros((n, hidden), jnp.float32),
                layer_mask=mask,
                activation=self.activation,
                scaling=self.scaling,
                residual=self.residual,
            )
        return {**params, "layers": layers}

    # jpeft's own adapter files (peft has no bottleneck adapters): peft's directory
    # layout with these config keys and one tensor per field, layer and position.

    def adapter_config(self, cfg: LlamaConfig) -> dict[str, Any]:
        return {
            "peft_type": self.peft_type,
            "bottleneck": self.width(cfg),
            "activation": self.activation,
            "placement": list(self.positions),
            "residual": self.residual,
            "scaling": self.scaling,
            "layers": None if self.layers is None else list(self.layers),
            "num_layers": cfg.num_hidden_layers,
            "hidden_size": cfg.hidden_size,
        }

    def adapter_tensors(self, params: Params, cfg: LlamaConfig) -> dict[str, np.ndarray]:
        out = {}
        for entry, i, field, key, transposed in self._file_slots(cfg):
            array = np.asarray(getattr(params["layers"][entry], field)[i])
            out[key] = array.T if transposed else array
        return out

    @classmethod
    def read_adapter(
        cls, config: AdapterConfig, tensors: AdapterTensors, params: Params, cfg: LlamaConfig
    ) -> tuple[Adapter, Params]:
        hidden = config.require("hidden_size", int)
        if hidden != cfg.hidden_size:
            raise ValueError(
                f"{config.source}: hidden_size={hidden}, the model has {cfg.hidden_size}"
            )
        layers = config.get("layers", list, items=int)
        method = cls(
            bottleneck=config.require("bottleneck", int),
            activation=config.require("activation", str),
            placement=tuple(config.require("placement", list, items=str)),
            residual=config.require("residual", bool),
            scaling=float(config.require("scaling", NUMBER)),
            layers=None if layers is None else tuple(layers),
        )
        params = method.init(jax.random.key(0), params, cfg)
        fields = {
            entry: {f: np.array(getattr(params["layers"][entry], f)) for f in _FILE_NAMES}
            for entry in method.entries
        }
        for entry, i, field, key, transposed in method._file_slots(cfg):
            slot = fields[entry][field][i]
            found = tensors.take(key, slot.T.shape if transposed else slot.shape)
            fields[entry][field][i] = found.T if transposed else found
        layers = dict(params["layers"])
        for entry, arrays in fields.items():
            arrays = {field: jnp.asarray(array) for field, array in arrays.items()}
            layers[entry] = dataclasses.replace(layers[entry], **arrays)
        return method, {**params, "layers": layers}

    @property
    def entries(self) -> tuple[str, ...]:
        """The ``layers/...`` entries this method adds: ``adapter_attn``, ``adapter_mlp``."""
        return tuple(f"adapter_{position}" for position in self.positions)

    def _file_slots(self, cfg: LlamaConfig) -> Iterator[tuple[str, int, str, str, bool]]:
        """``(entry, layer, field, tensor name, stored transposed)`` of every file tensor."""
        for entry in self.entries:
            for i in self.adapted_layers(cfg):
                for field, (suffix, transposed) in _FILE_NAMES.items():
                    yield entry, i, field, f"{module_name(i, entry)}.{suffix}", transposed
