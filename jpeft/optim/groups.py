"""Parameter groups over optax: weight-decay masks, LoRA+ learning rates, clipping.

Groups are decided by *node type and field* (and, for tensors of the base
layout, by the leaf's role: the dict key it sits under, ``kernel``, ``scale``,
``bias`` or ``embedding``), never by matching path strings.

Weight-decay rule (:func:`decay_mask`):

* base tensors (plain arrays, or a :class:`jpeft.Trained` node) decay only in the
  ``kernel`` role (:data:`jpeft.nodes.DECAYED_ROLES`): no decay on norm scales,
  biases or embeddings;
* a PEFT node decays the fields its type declares (``node.decayed_fields(role)``,
  the ``decay=`` of :func:`jpeft.nodes.node`): LoRA ``a``/``b`` and bottleneck
  ``down``/``up`` matrices decay; DoRA magnitudes (scales, like norms), soft prompts,
  prefixes, LLaMA-Adapter prompts and gates, and adapter biases do not; a type that
  declares nothing decays all of its trainable fields (what ``optax.adamw`` does
  without a mask);
* inside a decayed field that holds a small network (a dict, e.g. a P-tuning
  prompt encoder), matrices decay and vectors (biases) do not.

LoRA+ trains the fields a node type declares as ``lora_plus=`` (LoRA's ``B``) faster.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
import optax

from jpeft.models.pytree import Tree
from jpeft.nodes import DECAYED_ROLES, Node, is_node

LabelFn = Callable[[Node | None, str | None, str | None, Any], Any]


def map_fields(tree: Tree, label: LabelFn) -> Tree:
    """Replace every array ``x`` in ``tree`` by ``label(node, field, role, x)``.

    ``node`` and ``field`` are the innermost PEFT node holding the array and its
    field name (None outside nodes); ``role`` is the last dict key above the array
    (for a node's own arrays: the key the node sits under). The result has
    ``tree``'s structure, so it serves as an optax mask or label tree.

    Example:
        >>> import jax.numpy as jnp
        >>> from jpeft.nodes import Trained
        >>> tree = {"norm": {"scale": Trained(jnp.ones(2))}}
        >>> map_fields(tree, lambda node, field, role, x: role)["norm"]["scale"].value
        'scale'
    """
    return _map(tree, label, None, None, None)


def _map(
    tree: Tree, label: LabelFn, node: Node | None, field: str | None, role: str | None
) -> Tree:
    if is_node(tree):
        fields = {n: _map(getattr(tree, n), label, tree, n, role) for n in type(tree).data_fields}
        return dataclasses.replace(tree, **fields)
    if isinstance(tree, dict):
        return {k: _map(v, label, node, field, str(k)) for k, v in tree.items()}
    if type(tree) in (list, tuple):
        return type(tree)(_map(v, label, node, field, role) for v in tree)
    return jax.tree.map(lambda x: label(node, field, role, x), tree)


def decay_mask(trainable: Tree) -> Tree:
    """Boolean tree: True where weight decay applies (the rule in the module docstring).

    Pass it (or the function itself) as ``mask`` of ``optax.adamw``.

    Example:
        >>> import jax.numpy as jnp
        >>> from jpeft.nodes import Trained
        >>> t = {"norm": {"scale": Trained(jnp.ones(2))},
        ...      "lm_head": {"kernel": Trained(jnp.ones((2, 3)))}}
        >>> m = decay_mask(t)
        >>> m["norm"]["scale"].value, m["lm_head"]["kernel"].value
        (False, True)
    """

    def label(node: Node | None, field: str | None, role: str | None, x: Any) -> bool:
        if node is None:
            return role in DECAYED_ROLES
        if field not in node.decayed_fields(role):
            return False
        return not isinstance(getattr(node, field), dict) or np.ndim(x) >= 2

    return map_fields(trainable, label)


def lora_plus_labels(trainable: Tree) -> Tree:
    """Label tree for ``optax.multi_transform``: ``"lora_b"`` on LoRA+ fields, else ``"default"``.

    Example:
        >>> import jax.numpy as jnp
        >>> from jpeft.nodes import Trained
        >>> lora_plus_labels({"norm": {"scale": Trained(jnp.ones(2))}})["norm"]["scale"].value
        'default'
    """

    def label(node: Node | None, field: str | None, role: str | None, x: Any) -> str:
        return "lora_b" if node is not None and field in node.lora_plus_fields else "default"

    return map_fields(trainable, label)


def scale_schedule(learning_rate: optax.ScalarOrSchedule, ratio: float) -> optax.ScalarOrSchedule:
    """``learning_rate * ratio`` for a float or an optax schedule.

    Example:
        >>> scale_schedule(0.5, 4.0), float(scale_schedule(lambda step: 0.5, 4.0)(0))
        (2.0, 2.0)
    """
    if callable(learning_rate):
        return lambda count: learning_rate(count) * ratio
    return learning_rate * ratio


def lora_plus(
    make_tx: Callable[[optax.ScalarOrSchedule], optax.GradientTransformation],
    learning_rate: optax.ScalarOrSchedule,
    ratio: float = 16.0,
) -> optax.GradientTransformation:
    """LoRA+ (Hayou et al. 2024): LoRA ``B`` matrices train at ``ratio x`` the learning rate.

    ``make_tx(lr)`` builds the optimizer for one learning rate; everything but the
    LoRA+ fields (a node type's ``lora_plus_fields``) uses ``learning_rate``.

    Example:
        >>> import jax.numpy as jnp
        >>> from jpeft.nodes import Trained
        >>> tx = lora_plus(lambda lr: optax.sgd(lr), 0.1, ratio=4.0)
        >>> t = {"norm": {"scale": Trained(jnp.ones(2))}}
        >>> _ = tx.init(t)
    """
    if ratio <= 0:
        raise ValueError(f"lora_plus ratio must be > 0, got {ratio}")
    transforms = {
        "default": make_tx(learning_rate),
        "lora_b": make_tx(scale_schedule(learning_rate, ratio)),
    }
    return optax.multi_transform(transforms, lora_plus_labels)


def with_clipping(
    tx: optax.GradientTransformation, max_norm: float | None
) -> optax.GradientTransformation:
    """``tx`` after clipping the gradient to global norm ``max_norm`` (None: unchanged).

    Example:
        >>> tx = with_clipping(optax.sgd(0.1), 1.0)
    """
    if max_norm is None:
        return tx
    if max_norm <= 0:
        raise ValueError(f"max_grad_norm must be > 0, got {max_norm}")
    return optax.chain(optax.clip_by_global_norm(max_norm), tx)


def adamw(
    learning_rate: optax.ScalarOrSchedule,
    *,
    weight_decay: float = 0.0,
    max_grad_norm: float | None = None,
    lora_plus_ratio: float | None = None,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    base: Callable[..., optax.GradientTransformation] = optax.adamw,
) -> optax.GradientTransformation:
    """AdamW with :func:`decay_mask`, optional LoRA+ and optional global-norm clipping.

    ``base`` builds the AdamW itself from ``(lr, b1=, b2=, eps=, weight_decay=, mask=)``:
    ``optax.adamw`` or ``jpeft.optim.adamw_8bit``.

    Example:
        >>> import jax.numpy as jnp
        >>> from jpeft.nodes import Trained
        >>> tx = adamw(2e-4, weight_decay=0.01, max_grad_norm=1.0, lora_plus_ratio=16.0)
        >>> _ = tx.init({"norm": {"scale": Trained(jnp.ones(2))}})
    """

    def make(lr: optax.ScalarOrSchedule) -> optax.GradientTransformation:
        return base(lr, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay, mask=decay_mask)

    tx = (
        make(learning_rate)
        if lora_plus_ratio is None
        else lora_plus(make, learning_rate, lora_plus_ratio)
    )
    return with_clipping(tx, max_grad_norm)
