"""``jpeft train --resume``: continue exactly the run that was checkpointed, or refuse.

A resumed run reads its options from the run's ``run.yaml``; options given again on the
command line or in ``--config`` may only change what is logged, evaluated or kept and
where the run executes (the options marked ``neutral`` in :mod:`jpeft.train.config`:
``--log-every``, ``--eval-every``, ``--save-every``, ``--mesh``...; a new mesh or remat
policy computes the same steps, up to floating-point reduction order). Any other change
(``--lora-alpha``, ``--batch-size``, ``--seed``, the learning rate...) would make the
rest of the run differ from the one that was checkpointed, so it is refused, naming
each option and both values. After a divergence stop (a non-finite loss) the run's
trajectory has already ended, and the optimization options may change (e.g. a lower
``--lr``).
"""

from __future__ import annotations

from typing import Any

from jpeft.train import config, methods
from jpeft.train.config import RunConfig

Change = tuple[str, Any, Any]


def changes(saved: RunConfig, now: RunConfig) -> list[Change]:
    """``[(flag, value in the run, value now)]`` for options that change the trajectory.

    Example:
        >>> changes(RunConfig(), RunConfig(seed=1, log_every=5))
        [('--seed', 0, 1)]
    """
    out: list[Change] = []
    for name, f in config.fields().items():
        old, new = _effective(saved, name), _effective(now, name)
        if old == new or (f.metadata["neutral"] and not _splits_training_data(name, old, new)):
            continue
        if name == "steps" and _steps_kept_schedule(saved, now):
            continue
        out.append((_flag(name), old, new))
    if saved.method == now.method:
        old_options, new_options = _method_options(saved), _method_options(now)
        for option in sorted(set(old_options) | set(new_options)):
            old, new = old_options.get(option), new_options.get(option)
            if old != new:
                out.append((_flag(f"{now.method}_{option}"), old, new))
    return out


def check_options(
    saved: RunConfig, now: RunConfig, out: str, *, diverged: bool = False
) -> list[Change]:
    """Refuse options that change the run's trajectory; return the allowed changes.

    ``diverged``: the newest checkpoint was saved by a divergence stop, so the
    ``optimization`` options may change.

    Example:
        >>> check_options(RunConfig(), RunConfig(lr=0.1), "runs/x")  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ValueError: --resume runs/x: ...
          --lr: 0.003 in the run, 0.1 now
        ...
        >>> check_options(RunConfig(), RunConfig(lr=0.1), "runs/x", diverged=True)
        [('--lr', 0.003, 0.1)]
    """
    found = changes(saved, now)
    groups = {_flag(name): f.metadata["group"] for name, f in config.fields().items()}
    allowed = [c for c in found if diverged and groups.get(c[0]) == "optimization"]
    refused = [c for c in found if c not in allowed]
    if not refused:
        return allowed
    lines = "\n".join(f"  {flag}: {old!r} in the run, {new!r} now" for flag, old, new in refused)
    given = " ".join(f"{flag} {new}" for flag, new in ((c[0], c[2]) for c in refused))
    raise ValueError(
        f"--resume {out}: these options differ from the run's and would change what it "
        f"trains from the checkpoint on:\n{lines}\nresume without them, or start a new run "
        f"with them: jpeft train --config {out}/run.yaml --output-dir NEW_DIR {given}"
    )


def check_steps(run: RunConfig, step: int, out: str) -> None:
    """``--steps`` may not end a resumed run before its checkpoint.

    Example:
        >>> check_steps(RunConfig(steps=3), 5, "runs/x")  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ValueError: --resume runs/x: the checkpoint is at step 5, past --steps 3...
    """
    if run.steps < step:
        raise ValueError(
            f"--resume {out}: the checkpoint is at step {step}, past --steps {run.steps}; "
            f"evaluate or export it instead (jpeft eval --run {out})"
        )


def _effective(run: RunConfig, name: str) -> Any:
    """The value an option takes effect with (``lr`` None means the method's default)."""
    if name == "lr" and run.lr is None:
        return run.spec.lr
    return getattr(run, name)


def _splits_training_data(name: str, old: Any, new: Any) -> bool:
    """Without --eval-data the held-out set is split off the training data."""
    return name == "eval_data" and None in (old, new)


def _steps_kept_schedule(saved: RunConfig, now: RunConfig) -> bool:
    """A constant schedule whose warmup ends within both runs does not depend on --steps."""
    warm = now.warmup_steps <= min(saved.steps, now.steps)
    return saved.schedule == now.schedule == "constant" and warm


def _method_options(run: RunConfig) -> dict[str, Any]:
    options = {**methods.option_defaults(run.method), **run.options()}
    return {k: list(v) if isinstance(v, tuple) else v for k, v in options.items()}


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")
