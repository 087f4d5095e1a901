"""The ``jpeft`` command: ``train``, ``eval``, ``generate`` and ``export``.

``jpeft train`` with no arguments fine-tunes the bundled tiny LLaMA with LoRA on the
bundled task and prints the held-out accuracy before and after. Every option of
:class:`jpeft.train.config.RunConfig` is a flag (``--batch-size 8``) and a config-file key;
every method option is a ``--<method>-<option>`` flag and a ``[<method>]`` key.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from collections.abc import Sequence
from typing import Any

from jpeft import __version__
from jpeft.train import config, methods
from jpeft.train.data import formats as data_formats
from jpeft.train.values import list_item_type, type_name

EVAL_OPTIONS = ("eval_data", "seq_len", "packing", "eval_batch_size", "eval_samples")
EVAL_OPTIONS += ("max_new_tokens", "mesh", "truncate", "data_format")
MODEL_OPTIONS = ("model", "tokenizer", "dtype", "compute_dtype", "quantize")
TRAIN_EPILOG = """\
examples:
  jpeft train                                  # bundled model + task, LoRA, CPU, a few minutes
  jpeft train --method prefix --steps 500 --prefix-num-virtual-tokens 16
  jpeft train --config run.toml --lr 1e-3      # file first, flags override it
  jpeft train --resume runs/lora-20250101-120000
  jpeft train --mesh data=2,fsdp=2,tensor=2    # 8 devices
  jpeft train --coordinator host0:1234 --num-processes 2 --process-id 0   # on each host

config file (TOML, YAML or JSON): top-level options and one section per method, e.g.
  method = "lora"
  steps = 400
  [lora]
  r = 16
  targets = ["q_proj", "v_proj"]

exit status: 0 done, 1 non-finite loss (last good checkpoint saved), 2 bad input,
3 an output could not be written (e.g. the disk is full), 130 interrupted with Ctrl-C,
143 terminated with SIGTERM (checkpoint saved in both cases; continue with --resume).
"""
CACHE_ENV = "JPEFT_COMPILATION_CACHE"
SKIP_CORRUPT = (
    "if the newest checkpoint is corrupt, set it aside (<step>.corrupt) and use the newest good one"
)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``jpeft`` command line; returns the exit status.

    Example:
        >>> main(["train", "--lr", "0"])  # stderr: "lr must be finite and > 0, found 0.0"
        2
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        _compilation_cache(args.compilation_cache)
        _check_processes(args)
        if getattr(args, "coordinator", None):
            from jpeft.train import distributed

            distributed.initialize(args.coordinator, args.num_processes, args.process_id)
        return args.handler(args)
    except (ValueError, FileNotFoundError) as e:
        print(f"jpeft {args.command}: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"jpeft {args.command}: error: {e}", file=sys.stderr)
        return 3


def default_cache_dir() -> str:
    """``$XDG_CACHE_HOME/jpeft/xla`` (``~/.cache/jpeft/xla``): the compilation cache.

    Example:
        >>> default_cache_dir().endswith(os.path.join("jpeft", "xla"))
        True
    """
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(root, "jpeft", "xla")


def _compilation_cache(directory: str) -> None:
    """Turn on JAX's persistent compilation cache in ``directory`` ('none': off)."""
    import jax

    if directory.lower() == "none":
        jax.config.update("jax_enable_compilation_cache", False)
        return
    jax.config.update("jax_enable_compilation_cache", True)
    jax.config.update("jax_compilation_cache_dir", directory)
    # jpeft's programs are small on small models: cache them all, not only slow ones
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)


def _check_processes(args: argparse.Namespace) -> None:
    """Several processes need a coordinator (without one each would run alone as rank 0)."""
    processes, index = getattr(args, "num_processes", 1), getattr(args, "process_id", 0)
    if not getattr(args, "coordinator", None) and (processes != 1 or index != 0):
        raise ValueError(
            f"--num-processes {processes} --process-id {index} needs --coordinator HOST:PORT "
            "(the address of process 0); without it every process would train alone"
        )


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with its four subcommands.

    Example:
        >>> build_parser().parse_args(["train", "--steps", "5"]).command
        'train'
    """
    parser = argparse.ArgumentParser(
        prog="jpeft", description="Parameter-efficient fine-tuning of LLaMA models in JAX."
    )
    parser.add_argument("--version", action="version", version=f"jpeft {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    shared = _shared_options()

    def command(
        name: str, handler: Any, help: str, parents: Sequence[Any] = (), **kwargs: Any
    ) -> argparse.ArgumentParser:
        parents = [shared, *parents]
        p = sub.add_parser(name, parents=parents, help=help, description=help, **kwargs)
        p.set_defaults(handler=handler)
        return p

    formatter = argparse.RawDescriptionHelpFormatter
    epilog = f"{TRAIN_EPILOG}\n{data_formats.HELP}"
    train = command("train", _train, "fine-tune a model", epilog=epilog, formatter_class=formatter)
    train.add_argument("--resume", metavar="RUN_DIR", help="continue a run from its checkpoint")
    train.add_argument(
        "--overwrite",
        action="store_true",
        help="start over in a non-empty --output-dir, deleting the run that is there",
    )
    train.add_argument("--skip-corrupt-checkpoints", action="store_true", help=SKIP_CORRUPT)
    dist = train.add_argument_group("multi-process (multi-host) runs")
    dist.add_argument("--coordinator", metavar="HOST:PORT", help="address of process 0")
    dist.add_argument("--num-processes", type=int, default=1, help="processes in the run")
    dist.add_argument("--process-id", type=int, default=0, help="this process's index")
    _run_options(train, list(config.fields()))
    _method_options(train)

    trained = argparse.ArgumentParser(add_help=False)
    source = trained.add_argument_group("trained part (default: the base model alone)")
    source.add_argument("--adapter", metavar="DIR", help="peft adapter directory")
    source.add_argument("--run", metavar="RUN_DIR", help="run directory: its newest checkpoint")
    source.add_argument("--step", type=int, help="with --run: this checkpoint step")
    source.add_argument("--skip-corrupt-checkpoints", action="store_true", help=SKIP_CORRUPT)

    evaluate = command("eval", _eval, "held-out loss, perplexity and accuracy", parents=[trained])
    _run_options(evaluate, [*MODEL_OPTIONS, *EVAL_OPTIONS])
    generate = command("generate", _generate, "generate text", parents=[trained])
    generate.add_argument("--prompt", action="append", default=[], help="a prompt (repeatable)")
    generate.add_argument("--raw", action="store_true", help="no chat template: the text as is")
    generate.add_argument("--max-new-tokens", type=int, default=64, help="tokens per prompt")
    generate.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    generate.add_argument("--top-p", type=float, default=1.0, help="nucleus mass")
    generate.add_argument("--top-k", type=int, default=0, help="0: no top-k filter")
    generate.add_argument("--seed", type=int, default=0, help="sampling seed")
    _run_options(generate, [*MODEL_OPTIONS, "mesh"])
    export = command(
        "export", _export, "write a peft adapter or a merged HF model", parents=[trained]
    )
    export.add_argument("--out", required=True, metavar="DIR", help="output directory")
    export.add_argument("--merged", action="store_true", help="fold into the base: an HF model")
    export.add_argument("--save-dtype", choices=config.DTYPES, help="dtype of merged weights")
    export.add_argument("--overwrite", action="store_true", help="write into a non-empty --out")
    _run_options(export, [*MODEL_OPTIONS, "mesh"])
    return parser


def _shared_options() -> argparse.ArgumentParser:
    """Options of every command: the config file and the compilation cache."""
    shared = argparse.ArgumentParser(add_help=False)
    shared.add_argument("--config", metavar="FILE", help="TOML, YAML or JSON options file")
    shared.add_argument(
        "--compilation-cache",
        metavar="DIR",
        default=os.environ.get(CACHE_ENV) or default_cache_dir(),
        help=f"JAX's persistent compilation cache, so a second start skips most compiling "
        f"(default: ${CACHE_ENV}, else {default_cache_dir()}); 'none' turns it off",
    )
    shared.add_argument(
        "--no-compilation-cache",
        dest="compilation_cache",
        action="store_const",
        const="none",
        help="compile everything afresh (same as --compilation-cache none)",
    )
    return shared


def _run_options(parser: argparse.ArgumentParser, names: list[str]) -> None:
    """One flag per RunConfig option, grouped; defaults stay unset so files are not overridden."""
    fields, types = config.fields(), config.field_types()
    groups: dict[str, Any] = {}
    for name in names:
        f = fields[name]
        group = f.metadata["group"]
        if group not in groups:
            groups[group] = parser.add_argument_group(f"{group} options")
        meta = f.metadata
        _flag(
            groups[group],
            name,
            types[name],
            f.default,
            meta["help"],
            "run." + name,
            meta["choices"],
        )


def _method_options(parser: argparse.ArgumentParser) -> None:
    for spec in methods.METHODS.values():
        if not spec.available():
            parser.add_argument_group(
                f"{spec.name} options", f"{spec.target} is not available in this jpeft version"
            )
            continue
        group = parser.add_argument_group(f"{spec.name} options ({spec.target})")
        defaults = methods.option_defaults(spec.name)
        for name, tp in methods.option_types(spec.name).items():
            flag = f"{spec.name}-{name}"
            help = "comma-separated names or re:<regex>" if name in spec.lists else ""
            item = list_item_type(tp)
            if item is not None and not help:
                help = f"comma-separated {type_name(item)}s, e.g. 0,1 or [0,1]"
            _flag(group, flag, tp, defaults.get(name), help, f"method.{spec.name}.{name}")


def _flag(
    group: Any, name: str, tp: Any, default: Any, help: str, dest: str, choices: Any = None
) -> None:
    flag = "--" + name.replace("_", "-")
    if "default:" not in help:
        shown = "none" if default is None else default
        help = f"{help} (default: {shown})" if help else f"default: {shown}"
    kwargs: dict[str, Any] = {"dest": dest, "default": argparse.SUPPRESS}
    kwargs["help"] = help.replace("%", "%%")
    if tp is bool or tp == bool | None:
        group.add_argument(flag, action=argparse.BooleanOptionalAction, **kwargs)
    elif choices:
        group.add_argument(flag, choices=choices, metavar="{" + "|".join(choices) + "}", **kwargs)
    else:
        group.add_argument(flag, metavar=type_name(tp).split()[0].upper(), **kwargs)


def run_config(args: argparse.Namespace, saved: str | None = None) -> config.RunConfig:
    """The RunConfig of a command: defaults < ``saved`` run's run.yaml < --config < flags.

    Example:
        >>> run_config(build_parser().parse_args(["train", "--steps", "7"])).steps
        7
    """
    run = config.saved(saved) if saved else config.RunConfig()
    if args.config:
        run = config.apply(run, config.load_file(args.config), args.config)
    flags: dict[str, Any] = {}
    for dest, value in vars(args).items():
        if dest.startswith("run."):
            flags[dest[4:]] = value
        elif dest.startswith("method."):
            _, method, option = dest.split(".", 2)
            flags.setdefault(method, {})[option] = value
    return config.apply(run, flags, "command line")


def _model(args: argparse.Namespace, run: config.RunConfig) -> Any:
    from jpeft.train import commands

    fall_back = args.skip_corrupt_checkpoints
    return commands.load_model(run, args.adapter, args.run, args.step, fall_back=fall_back)


def _train(args: argparse.Namespace) -> int:
    from jpeft.train.loop import train

    run = run_config(args, args.resume)
    own_data = _sets(args, "train_data") and not _same_file(
        run.train_data, config.RunConfig().train_data
    )
    if not args.resume and own_data and not _sets(args, "eval_data"):
        # the bundled held-out set belongs to the bundled task, not to the user's data
        run = dataclasses.replace(run, eval_data=None)
    outcome = train(
        run,
        resume=args.resume,
        overwrite=args.overwrite,
        fall_back=args.skip_corrupt_checkpoints,
    )
    return outcome.exit_code


def _eval(args: argparse.Namespace) -> int:
    from jpeft.train import commands

    run = run_config(args, args.run)
    if not args.run and not _sets(args, "eval_data") and not _bundled(run.model):
        raise ValueError(
            f"jpeft eval --model {run.model} needs --eval-data FILE: the bundled held-out "
            "set is the bundled model's task"
        )
    commands.evaluate(run, _model(args, run))
    return 0


def _sets(args: argparse.Namespace, option: str) -> bool:
    """Whether the command line or ``--config`` sets RunConfig's ``option``."""
    if f"run.{option}" in vars(args):
        return True
    keys = config.load_file(args.config) if args.config else {}
    return any(str(key).replace("-", "_") == option for key in keys)


def _same_file(path: str, other: str) -> bool:
    return os.path.realpath(config.resolve_path(path)) == os.path.realpath(
        config.resolve_path(other)
    )


def _bundled(model: str) -> bool:
    return _same_file(model, config.RunConfig().model)


def _generate(args: argparse.Namespace) -> int:
    from jpeft.train import commands

    run = run_config(args, args.run)
    model = _model(args, run)
    outputs = commands.generate(
        model,
        args.prompt,
        raw=args.raw,
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        seed=args.seed,
        compute_dtype=run.compute_dtype,
    )
    for prompt, output in zip(args.prompt, outputs, strict=True):
        print(f"{prompt}\n-> {output}")
    return 0


def _export(args: argparse.Namespace) -> int:
    from jpeft.train import commands, prepare

    run = run_config(args, args.run)
    model_dir = prepare.model_dir(run.model)
    commands.check_out_dir(args.out, [model_dir, args.adapter, args.run], args.overwrite)
    model = _model(args, run)
    what = commands.export(model, args.out, merged=args.merged, dtype=args.save_dtype)
    print(f"wrote {what}: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
