"""The run configuration: a typed :class:`RunConfig` from defaults, a config file and flags.

Precedence, lowest first: the defaults below (which fine-tune the bundled tiny model
with LoRA on the bundled task), the saved config of a resumed run, a ``--config`` file
(TOML, YAML or JSON), then command-line flags. A config file holds the top-level options
and one section per method::

    method = "lora"
    steps = 400
    lr = 2e-3
    [lora]
    r = 16
    targets = ["q_proj", "v_proj"]

An unknown key or a value of the wrong type is a ValueError naming it.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import os
import tomllib
import typing
from collections.abc import Mapping
from typing import Any

import yaml

from jpeft import assets
from jpeft.models.atomic import write_text
from jpeft.models.attention import IMPLEMENTATIONS
from jpeft.models.llama import DEFAULT_REMAT, REMAT_POLICIES
from jpeft.train import methods
from jpeft.train.data.formats import FORMATS
from jpeft.train.values import coerce

DTYPES = ("float32", "bfloat16", "float16")
DATA_FORMATS = ("auto", *FORMATS)


def _opt(
    default: Any, group: str, help: str, choices: tuple | None = None, *, neutral: bool = False
) -> Any:
    """A RunConfig option; ``neutral``: changing it on ``--resume`` leaves the training
    trajectory as it was (what is logged or kept, where it runs), so it is allowed."""
    meta = {"group": group, "help": help, "choices": choices, "neutral": neutral}
    return dataclasses.field(default=default, metadata=meta)


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """Every option of a training run (see ``jpeft train --help`` for each one).

    Example:
        >>> RunConfig().method, RunConfig(steps=10).steps
        ('lora', 10)
    """

    model: str = _opt("assets/tiny-llama", "model", "HF LLaMA model directory")
    tokenizer: str | None = _opt(
        None, "model", "directory with tokenizer.json (default: the model directory)"
    )
    dtype: str = _opt("float32", "model", "dtype of the frozen base weights", DTYPES)
    compute_dtype: str = _opt(
        "auto",
        "model",
        "dtype of activations and matmuls (auto: bfloat16 on GPU/TPU, float32 on CPU)",
        ("auto", *DTYPES),
    )
    quantize: str | None = _opt(
        None, "model", "quantize the base linears while loading (nf4); qlora does it anyway"
    )
    remat: str = _opt(
        DEFAULT_REMAT,
        "model",
        "what each layer saves for the backward pass (models/llama.py REMAT_POLICIES)",
        tuple(REMAT_POLICIES),
        neutral=True,
    )
    attention_impl: str = _opt(
        "auto", "model", "attention kernel (auto: pallas on GPU/TPU, xla on CPU)", IMPLEMENTATIONS
    )
    train_data: str = _opt(
        "assets/data/train.jsonl", "data", "JSONL, JSON or Parquet records, or a text file"
    )
    eval_data: str | None = _opt(
        "assets/data/eval.jsonl",
        "data",
        "held-out data file ('none': split off the training data, the default with your own "
        "--train-data)",
        neutral=True,
    )
    data_format: str = _opt(
        "auto",
        "data",
        "record format (auto: from each record's keys; see jpeft train --help)",
        DATA_FORMATS,
    )
    eval_fraction: float = _opt(0.1, "data", "held-out fraction when --eval-data is none")
    seq_len: int = _opt(64, "data", "tokens per row (at most the model's context)")
    packing: bool | None = _opt(
        None, "data", "pack several examples per row (default: yes, unless soft prompts)"
    )
    truncate: bool = _opt(False, "data", "cut examples longer than --seq-len instead of failing")
    method: str = _opt("lora", "method", "PEFT method", tuple(methods.METHODS))
    steps: int = _opt(300, "optimization", "optimizer steps in total")
    batch_size: int = _opt(16, "optimization", "rows per step (global, all processes)")
    grad_accum: int = _opt(1, "optimization", "micro-batches per step")
    lr: float | None = _opt(None, "optimization", "peak learning rate (default: the method's)")
    schedule: str = _opt(
        "cosine",
        "optimization",
        "learning-rate decay after warmup",
        ("constant", "linear", "cosine"),
    )
    warmup_steps: int = _opt(20, "optimization", "linear warmup steps")
    optimizer: str = _opt(
        "adamw", "optimization", "optimizer", ("adamw", "adamw-8bit", "paged-adamw", "sgd")
    )
    weight_decay: float = _opt(0.0, "optimization", "decoupled weight decay (kernels only)")
    max_grad_norm: float | None = _opt(1.0, "optimization", "clip the global gradient norm")
    lora_plus_ratio: float | None = _opt(None, "optimization", "LoRA+: lr multiplier of B")
    seed: int = _opt(0, "optimization", "seed of initialization, data order and dropout")
    eval_every: int = _opt(
        100, "evaluation", "evaluate every N steps (0: only before/after)", neutral=True
    )
    eval_samples: int = _opt(
        200, "evaluation", "examples generated for accuracy (0: none)", neutral=True
    )
    eval_batch_size: int = _opt(32, "evaluation", "rows per evaluation batch", neutral=True)
    max_new_tokens: int | None = _opt(
        None, "evaluation", "generation length for accuracy (default: longest answer)", neutral=True
    )
    log_every: int = _opt(10, "output", "write training metrics every N steps", neutral=True)
    save_every: int = _opt(
        100, "output", "checkpoint every N steps (0: only at the end)", neutral=True
    )
    keep_checkpoints: int = _opt(3, "output", "checkpoints to keep", neutral=True)
    output_dir: str | None = _opt(
        None, "output", "run directory (default: runs/<method>-<time>)", neutral=True
    )
    mesh: str = _opt(
        "data=-1", "distributed", "device mesh, e.g. data=2,fsdp=2,tensor=2", neutral=True
    )
    method_options: Mapping[str, Mapping[str, Any]] = dataclasses.field(
        default_factory=dict, metadata={"group": None}
    )

    @property
    def spec(self) -> methods.MethodSpec:
        """The :class:`jpeft.train.methods.MethodSpec` of ``method``."""
        return methods.spec_for(self.method)

    def options(self) -> dict[str, Any]:
        """The user's options of the selected method (our defaults are applied by ``build``)."""
        return dict(self.method_options.get(self.method, {}))


def fields() -> dict[str, dataclasses.Field]:
    """``{name: field}`` of the options settable by flags and config keys.

    Example:
        >>> "steps" in fields() and "method_options" not in fields()
        True
    """
    return {f.name: f for f in dataclasses.fields(RunConfig) if f.metadata["group"]}


def field_types() -> dict[str, Any]:
    """``{name: type}`` of :func:`fields`."""
    hints = typing.get_type_hints(RunConfig)
    return {name: hints[name] for name in fields()}


def load_file(path: str | os.PathLike) -> dict[str, Any]:
    """The dict of a ``.toml``, ``.yaml``/``.yml`` or ``.json`` config file.

    Example:
        >>> import tempfile
        >>> path = os.path.join(tempfile.mkdtemp(), "run.yaml")
        >>> with open(path, "w") as f:
        ...     json.dump({"method": "lora", "lora": {"r": 16}}, f)  # JSON is YAML too
        >>> load_file(path)
        {'method': 'lora', 'lora': {'r': 16}}
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"config file not found: {path!r}")
    suffix = os.path.splitext(path)[1].lower()
    try:
        if suffix == ".toml":
            with open(path, "rb") as f:
                data = tomllib.load(f)  # refuses a repeated key itself
        elif suffix in (".yaml", ".yml", ".json"):
            with open(path, encoding="utf-8") as f:
                if suffix == ".json":
                    data = json.load(f, object_pairs_hook=_unique_keys)
                else:
                    data = yaml.load(f, Loader=_UniqueKeyLoader)  # a SafeLoader
        else:
            raise ValueError(f"{path}: unknown config format {suffix!r}; use .toml, .yaml or .json")
    except (tomllib.TOMLDecodeError, yaml.YAMLError, json.JSONDecodeError, _DuplicateKey) as e:
        raise ValueError(f"{path}: cannot parse: {e}") from e
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping of options, found {type(data).__name__}")
    return data


class _DuplicateKey(ValueError):
    pass


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise _DuplicateKey(f"the key {key!r} is given twice")
        out[key] = value
    return out


class _UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML's safe loader, refusing a key repeated in one mapping (it keeps the last)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise _DuplicateKey(
                    f"line {key_node.start_mark.line + 1}: the key {key!r} is given twice"
                )
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def saved(run_dir: str | os.PathLike) -> RunConfig:
    """The options a run directory was started with (its ``run.yaml``).

    Example:
        >>> saved("no/such/run")
        Traceback (most recent call last):
        FileNotFoundError: 'no/such/run' is not a run directory (no run.yaml)
    """
    path = os.path.join(run_dir, "run.yaml")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{os.fspath(run_dir)!r} is not a run directory (no run.yaml)")
    return apply(RunConfig(), load_file(path), path)


def apply(config: RunConfig, values: Mapping[str, Any], source: str) -> RunConfig:
    """``config`` with ``values`` (top-level options and ``{method: {option: value}}``).

    Keys may use ``-`` or ``_``. Unknown keys raise ValueError naming ``source`` and the
    closest valid key.

    Example:
        >>> apply(RunConfig(), {"steps": "5", "lora": {"r": 4}}, "flags").method_options
        {'lora': {'r': 4}}
    """
    types = field_types()
    updates: dict[str, Any] = {}
    sections = {name: dict(opts) for name, opts in config.method_options.items()}
    for raw_key, value in values.items():
        key = str(raw_key).replace("-", "_")
        if raw_key in methods.METHODS:
            if not isinstance(value, Mapping):
                raise ValueError(f"{source}: [{raw_key}] must be a section of method options")
            sections.setdefault(raw_key, {}).update(_method_values(raw_key, value, source))
        elif key in types:
            updates[key] = coerce(value, types[key], f"{source}: {key}")
        else:
            raise ValueError(f"{source}: unknown option {raw_key!r}{_suggest(key, types)}")
    new = dataclasses.replace(config, **updates, method_options=sections)
    check(new)
    return new


def _method_values(name: str, values: Mapping[str, Any], source: str) -> dict[str, Any]:
    spec = methods.spec_for(name)
    types = methods.option_types(name)
    out = {}
    for raw_key, value in values.items():
        key = str(raw_key).replace("-", "_")
        if key not in types:
            raise ValueError(
                f"{source}: unknown option {raw_key!r} of method {name!r}{_suggest(key, types)}"
            )
        where = f"{source}: {name}.{key}"
        out[key] = coerce(value, types[key], where, as_list=key in spec.lists)
    return out


def check(config: RunConfig) -> None:
    """Raise ValueError for values outside their choices or ranges.

    Example:
        >>> check(RunConfig(steps=0))
        Traceback (most recent call last):
        ValueError: steps must be >= 1, found 0
    """
    for name, f in fields().items():
        choices = f.metadata["choices"]
        value = getattr(config, name)
        if choices and value not in choices:
            raise ValueError(f"{name} must be one of {', '.join(choices)}; found {value!r}")
    positive = ("steps", "batch_size", "grad_accum", "seq_len", "eval_batch_size", "log_every")
    non_negative = ("warmup_steps", "eval_every", "eval_samples", "save_every")
    for name in positive + non_negative + ("keep_checkpoints", "max_new_tokens"):
        value = getattr(config, name)
        low = 0 if name in non_negative else 1
        if value is not None and value < low:
            raise ValueError(f"{name} must be >= {low}, found {value}")
    for name, low, allow_zero in _FLOAT_RANGES:
        value = getattr(config, name)
        if value is None:
            continue
        if not math.isfinite(value) or value < low or (value == low and not allow_zero):
            relation = ">=" if allow_zero else ">"
            raise ValueError(f"{name} must be finite and {relation} {low:g}, found {value}")
    if not 0.0 < config.eval_fraction < 1.0:
        raise ValueError(f"eval_fraction must be in (0, 1), found {config.eval_fraction}")
    if config.batch_size % config.grad_accum:
        raise ValueError(
            f"batch_size {config.batch_size} is not a multiple of grad_accum {config.grad_accum}"
        )


# (option, lower bound, bound allowed): checked before anything compiles.
_FLOAT_RANGES = (
    ("lr", 0.0, False),
    ("weight_decay", 0.0, True),
    ("max_grad_norm", 0.0, False),
    ("lora_plus_ratio", 0.0, False),
)


def to_dict(config: RunConfig) -> dict[str, Any]:
    """The config as plain data (tuples as lists), loadable with :func:`apply`.

    Example:
        >>> to_dict(RunConfig())["method"]
        'lora'
    """
    out: dict[str, Any] = {name: getattr(config, name) for name in fields()}
    for name, options in config.method_options.items():
        out[name] = {k: list(v) if isinstance(v, tuple) else v for k, v in options.items()}
    return out


def save(config: RunConfig, path: str | os.PathLike) -> None:
    """Write the config as YAML, atomically (``jpeft train --config`` reads it back)."""
    write_text(path, yaml.safe_dump(to_dict(config), sort_keys=False))


def resolve_path(path: str) -> str:
    """A bundled ``assets/...`` path that is missing here, looked up in the installed package.

    Example:
        >>> os.path.isdir(resolve_path("assets/tiny-llama"))  # from any directory
        True
    """
    return assets.resolve(path)


def _suggest(key: str, valid: Mapping[str, Any]) -> str:
    close = difflib.get_close_matches(key, list(valid), n=1)
    hint = f"; did you mean {close[0].replace('_', '-')!r}?" if close else ""
    return f"{hint} (valid: {', '.join(sorted(valid))})"
