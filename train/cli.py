"""The ``jpeft`` command: ``train``, ``eval``, ``generate`` and ``export``.

``jpeft train`` with no arguments fine-tunes the bundled tiny LLaMA with LoRA on the
bundled task and prints the held-out accuracy before and after. Every option of
:class:`jpeft.train.config.RunConfig` is a flag (``--batch-size 8``) and a config-file key;
every method option is a ``--<method>-<option>`` flag and a ``[<method>]`` key.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from typing import Any

from jpeft.train import config, methods
from jpeft.train.data import formats as data_formats
from jpeft.train.values import type_name

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
130 interrupted with Ctrl-C (checkpoint saved; continue with --resume).
"""


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``jpeft`` command line; returns the exit status.

    Example:
        >>> main(["train", "--steps", "3", "--output-dir", "/tmp/run"])  # doctest: +SKIP
        0
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if getattr(args, "coordinator", None):
            from jpeft.train import distributed

            distributed.initialize(args.coordinator, args.num_processes, args.process_id)
        return args.handler(args)
    except (ValueError, FileNotFoundError) as e:
        print(f"jpeft {args.command}: error: {e}", file=sys.stderr)
        return 2


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with its four subcommands.

    Example:
        >>> build_parser().parse_args(["train", "--steps", "5"]).command
        'train'
    """
    parser = argparse.ArgumentParser(
        prog="jpeft", description="Parameter-efficient fine-tuning of LLaMA models in JAX."
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    shared = argparse.ArgumentParser(add_help=False)
    shared.add_argument("--config", metavar="FILE", help="TOML, YAML or JSON options file")

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
    _run_options(export, [*MODEL_OPTIONS, "mesh"])
    return parser


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
    run = config.RunConfig()
    if saved:
        path = os.path.join(saved, "run.yaml")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{saved!r} is not a run directory (no run.yaml)")
        run = config.apply(run, config.load_file(path), path)
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


def _train(args: argparse.Namespace) -> int:
    from jpeft.train.loop import train

    return train(run_config(args, args.resume), resume=args.resume).exit_code


def _eval(args: argparse.Namespace) -> int:
    from jpeft.train import commands

    run = run_config(args, args.run)
    commands.evaluate(run, commands.load_model(run, args.adapter, args.run, args.step))
    return 0


def _generate(args: argparse.Namespace) -> int:
    from jpeft.train import commands

    run = run_config(args, args.run)
    model = commands.load_model(run, args.adapter, args.run, args.step)
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
    from jpeft.train import commands

    run = run_config(args, args.run)
    model = commands.load_model(run, args.adapter, args.run, args.step)
    what = commands.export(model, args.out, merged=args.merged, dtype=args.save_dtype)
    print(f"wrote {what}: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
