"""Reparameterization networks of prompt learning, in plain JAX with peft's shapes.

* P-tuning (v1) MLP: ``Linear(d, h) ReLU Linear(h, h) ReLU Linear(h, d)``.
* P-tuning (v1) LSTM: a bidirectional ``LSTM(d, h, num_layers)`` (torch's gate order
  i, f, g, o; dropout between layers while training), then
  ``Linear(2h, 2h) ReLU Linear(2h, d)``.
* Prefix projection: ``Linear(d, h) tanh Linear(h, L * 2 * d)``.

Weights are plain pytrees; a linear is ``{"kernel": [in, out], "bias": [out]}`` and
every initializer follows torch's defaults (uniform ``±1/sqrt(fan_in)`` for linears,
``±1/sqrt(h)`` for LSTM weights), as peft's modules start.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jpeft.models.pytree import Params


class Uniform(NamedTuple):
    """A tensor to draw from ``U(-bound, bound)`` (a leaf of an initializer spec)."""

    shape: tuple[int, ...]
    bound: float


def fill(key: jax.Array, spec: Any) -> Any:
    """Arrays for a tree of :class:`Uniform` leaves, drawn with one random call.

    One draw (one compile per total size) instead of one per tensor keeps
    initialization cheap; the slices are exact ``U(-bound, bound)`` samples.

    Example:
        >>> fill(jax.random.key(0), {"w": Uniform((2, 3), 0.5)})["w"].shape
        (2, 3)
    """
    leaves, treedef = jax.tree.flatten(spec, is_leaf=lambda x: isinstance(x, Uniform))
    sizes = [math.prod(leaf.shape) for leaf in leaves]
    flat = np.asarray(jax.random.uniform(key, (sum(sizes),), jnp.float32, -1.0, 1.0))
    arrays, start = [], 0
    for leaf, size in zip(leaves, sizes, strict=True):
        part = flat[start : start + size].reshape(leaf.shape) * np.float32(leaf.bound)
        arrays.append(jnp.asarray(part))
        start += size
    return jax.tree.unflatten(treedef, arrays)


def _linear(fan_in: int, fan_out: int) -> dict[str, Uniform]:
    bound = 1.0 / math.sqrt(fan_in)
    return {"kernel": Uniform((fan_in, fan_out), bound), "bias": Uniform((fan_out,), bound)}


def init_linear(key: jax.Array, fan_in: int, fan_out: int) -> Params:
    """A torch-initialized ``nn.Linear(fan_in, fan_out)`` with a ``[in, out]`` kernel.

    Example:
        >>> init_linear(jax.random.key(0), 4, 3)["kernel"].shape
        (4, 3)
    """
    return fill(key, _linear(fan_in, fan_out))


def linear(p: Params, x: jax.Array) -> jax.Array:
    """``x @ kernel + bias``."""
    return x @ p["kernel"].astype(x.dtype) + p["bias"].astype(x.dtype)


def init_mlp(key: jax.Array, dim: int, hidden: int) -> Params:
    """P-tuning's MLP head ``d -> h -> h -> d``.

    Example:
        >>> sorted(init_mlp(jax.random.key(0), 8, 4))
        ['hidden', 'input', 'output']
    """
    spec = {
        "input": _linear(dim, hidden),
        "hidden": _linear(hidden, hidden),
        "output": _linear(hidden, dim),
    }
    return fill(key, spec)


def mlp(p: Params, x: jax.Array) -> jax.Array:
    """P-tuning's MLP encoder on ``x [..., d]``.

    Example:
        >>> mlp(init_mlp(jax.random.key(0), 8, 4), jnp.ones((3, 8))).shape
        (3, 8)
    """
    h = jax.nn.relu(linear(p["input"], x))
    h = jax.nn.relu(linear(p["hidden"], h))
    return linear(p["output"], h)


def init_lstm(key: jax.Array, dim: int, hidden: int, num_layers: int) -> Params:
    """P-tuning's bidirectional LSTM plus its ``2h -> 2h -> d`` head.

    Each direction of layer ``l`` holds ``w_ih [in, 4h]``, ``w_hh [h, 4h]``,
    ``b_ih [4h]``, ``b_hh [4h]`` (torch's gate order i, f, g, o).

    Example:
        >>> p = init_lstm(jax.random.key(0), 8, 4, num_layers=2)
        >>> len(p["lstm"]), p["lstm"][1]["forward"]["w_ih"].shape
        (2, (8, 16))
    """
    if num_layers <= 0:
        raise ValueError(f"LSTM encoder: num_layers={num_layers} must be positive")
    bound = 1.0 / math.sqrt(hidden)
    layers = []
    for layer in range(num_layers):
        fan_in = dim if layer == 0 else 2 * hidden
        direction = {
            "w_ih": Uniform((fan_in, 4 * hidden), bound),
            "w_hh": Uniform((hidden, 4 * hidden), bound),
            "b_ih": Uniform((4 * hidden,), bound),
            "b_hh": Uniform((4 * hidden,), bound),
        }
        layers.append({"forward": direction, "backward": dict(direction)})
    spec = {
        "lstm": layers,
        "head": _linear(2 * hidden, 2 * hidden),
        "output": _linear(2 * hidden, dim),
    }
    return fill(key, spec)


def _lstm_direction(p: Params, x: jax.Array, reverse: bool) -> jax.Array:
    """One LSTM direction over ``x [n, in]`` from zero state: outputs ``[n, h]``."""
    hidden = p["w_hh"].shape[0]
    gates_in = x @ p["w_ih"] + p["b_ih"] + p["b_hh"]

    def step(carry, g_in):
        h, c = carry
        i, f, g, o = jnp.split(g_in + h @ p["w_hh"], 4)
        c = jax.nn.sigmoid(f) * c + jax.nn.sigmoid(i) * jnp.tanh(g)
        h = jax.nn.sigmoid(o) * jnp.tanh(c)
        return (h, c), h

    zeros = jnp.zeros((hidden,), x.dtype)
    _, out = jax.lax.scan(step, (zeros, zeros), gates_in, reverse=reverse)
    return out


def lstm(p: Params, x: jax.Array, dropout: float = 0.0, rng: jax.Array | None = None) -> jax.Array:
    """P-tuning's LSTM encoder on the virtual-token embeddings ``x [n, d]``.

    Dropout (rate ``dropout``) applies between LSTM layers when ``rng`` is given,
    as in torch's ``nn.LSTM`` in training mode.

    Example:
        >>> p = init_lstm(jax.random.key(0), 8, 4, num_layers=2)
        >>> lstm(p, jnp.ones((3, 8))).shape
        (3, 8)
    """
    h = x
    for index, layer in enumerate(p["lstm"]):
        if index and rng is not None and dropout > 0:
            keep = jax.random.bernoulli(jax.random.fold_in(rng, index), 1.0 - dropout, h.shape)
            h = jnp.where(keep, h / (1.0 - dropout), 0.0)
        forward = _lstm_direction(layer["forward"], h, reverse=False)
        backward = _lstm_direction(layer["backward"], h, reverse=True)
        h = jnp.concatenate([forward, backward], axis=-1)
    return linear(p["output"], jax.nn.relu(linear(p["head"], h)))


def init_projection(key: jax.Array, dim: int, hidden: int, out: int) -> Params:
    """Prefix tuning's reparameterization ``Linear(d, h) tanh Linear(h, out)``.

    Example:
        >>> init_projection(jax.random.key(0), 8, 4, 32)["output"]["kernel"].shape
        (4, 32)
    """
    return fill(key, {"input": _linear(dim, hidden), "output": _linear(hidden, out)})


def projection(p: Params, x: jax.Array) -> jax.Array:
    """Apply the prefix reparameterization to ``x [n, d]``."""
    return linear(p["output"], jnp.tanh(linear(p["input"], x)))


def _torch_linear(state: Mapping[str, Any], name: str) -> Params:
    return {
        "kernel": jnp.asarray(np.asarray(state[f"{name}.weight"]).T),
        "bias": jnp.asarray(np.asarray(state[f"{name}.bias"])),
    }


def from_torch(state: Mapping[str, Any], kind: str) -> Params:
    """Our encoder tree from the state dict of peft's ``PromptEncoder`` / ``PrefixEncoder``.

    ``kind`` is ``"MLP"``, ``"LSTM"`` (P-tuning) or ``"PROJECTION"`` (prefix tuning);
    ``state`` maps torch names (``mlp_head.0.weight``, ``lstm_head.weight_ih_l0_reverse``,
    ``transform.2.bias``...) to arrays. ``embedding.weight`` is not part of the
    encoder and is ignored.

    Example:
        >>> import peft
        >>> torch_encoder = peft.tuners.p_tuning.PromptEncoder(peft.PromptEncoderConfig(
        ...     task_type="CAUSAL_LM", num_virtual_tokens=4, token_dim=16,
        ...     num_transformer_submodules=1, encoder_hidden_size=8))
        >>> enc = from_torch(torch_encoder.state_dict(), "MLP")
        >>> {name: layer["kernel"].shape for name, layer in enc.items()}
        {'input': (16, 8), 'hidden': (8, 8), 'output': (8, 16)}
    """
    if kind == "MLP":
        names = {"input": "mlp_head.0", "hidden": "mlp_head.2", "output": "mlp_head.4"}
        return {ours: _torch_linear(state, theirs) for ours, theirs in names.items()}
    if kind == "PROJECTION":
        return {
            "input": _torch_linear(state, "transform.0"),
            "output": _torch_linear(state, "transform.2"),
        }
    if kind != "LSTM":
        raise ValueError(f"encoder kind {kind!r}; expected 'MLP', 'LSTM' or 'PROJECTION'")
    layers = []
    num_layers = sum(
        1 for k in state if k.startswith("lstm_head.weight_ih_l") and "reverse" not in k
    )
    for layer in range(num_layers):
        directions = {}
        for direction, suffix in (("forward", ""), ("backward", "_reverse")):

            def get(name: str, suffix: str = suffix, layer: int = layer) -> np.ndarray:
                return np.asarray(state[f"lstm_head.{name}_l{layer}{suffix}"])

            directions[direction] = {
                "w_ih": jnp.asarray(get("weight_ih").T),
                "w_hh": jnp.asarray(get("weight_hh").T),
                "b_ih": jnp.asarray(get("bias_ih")),
                "b_hh": jnp.asarray(get("bias_hh")),
            }
        layers.append(directions)
    return {
        "lstm": layers,
        "head": _torch_linear(state, "mlp_head.0"),
        "output": _torch_linear(state, "mlp_head.2"),
    }
