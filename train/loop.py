"""The training loop of ``jpeft train``: evaluate, train, checkpoint, evaluate, save.

A run directory holds ``run.yaml`` (the resolved config), ``metrics.jsonl``,
``checkpoints/<step>`` (orbax, trainable partition + optimizer state + data position),
``adapter/`` (peft format) and ``summary.json``. Resuming restores the newest
checkpoint and the data iterator's position, and the step's dropout key is derived from
the step number, so a resumed run continues exactly as an uninterrupted one would.
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils

import jpeft
from jpeft.train import build, config
from jpeft.train.checkpoint import Checkpointer
from jpeft.train.config import RunConfig
from jpeft.train.data import BatchIterator
from jpeft.train.distributed import is_main, local_rows, sync, to_host
from jpeft.train.evaluate import EvalResult, Evaluator
from jpeft.train.interrupt import Interrupts
from jpeft.train.metrics_log import MetricsLog, Progress, peak_memory_bytes, say
from jpeft.train.prepare import load_config_and_tokenizer, load_data, load_weights, packing
from jpeft.train.report import finish
from jpeft.train.sharding import RULES, make_mesh, shard_batch

EXIT_CODES = {"done": 0, "diverged": 1, "interrupted": 130}


@dataclasses.dataclass(frozen=True)
class Outcome:
    """How a run ended: ``status`` is ``done``, ``interrupted`` or ``diverged``."""

    status: str
    step: int
    run_dir: str
    before: EvalResult | None = None
    after: EvalResult | None = None

    @property
    def exit_code(self) -> int:
        """0 when done, 1 after a non-finite loss, 130 after Ctrl-C."""
        return EXIT_CODES[self.status]


def train(run: RunConfig, resume: str | None = None) -> Outcome:
    """Fine-tune ``run.model`` with ``run.method``; ``resume`` is a run directory to continue.

    Example:
        >>> outcome = train(RunConfig(steps=3))  # doctest: +SKIP
        >>> outcome.status, outcome.step  # doctest: +SKIP
        ('done', 3)
    """
    started_at = time.perf_counter()
    path, cfg, tokenizer = load_config_and_tokenizer(run.model, run.tokenizer)
    method = build.method(run, tokenizer)
    dataset = load_data(run, tokenizer, cfg)
    packed = packing(run)
    mesh = make_mesh(run.mesh)
    _check_batch_sizes(run, mesh)
    evaluator = Evaluator(
        cfg,
        tokenizer,
        dataset.eval,
        dataset.eval_records,
        mesh=mesh,
        batch_size=run.eval_batch_size,
        seq_len=run.seq_len,
        packing=packed,
        max_samples=run.eval_samples,
        max_new_tokens=run.max_new_tokens,
        compute_dtype=run.compute_dtype,
    )
    if evaluator.generation_length() > cfg.max_position_embeddings:
        raise ValueError(
            f"evaluation prompts plus {evaluator.max_new_tokens} new tokens need "
            f"{evaluator.generation_length()} positions, more than the model's context "
            f"(max_position_embeddings = {cfg.max_position_embeddings})"
        )
    batches = BatchIterator(
        dataset.train,
        batch_size=run.batch_size,
        seq_len=run.seq_len,
        packing=packed,
        seed=run.seed,
        pad_id=tokenizer.pad_id or 0,
    )
    base = load_weights(path, run)
    params = build.init_params(run, method, base, cfg)
    sizes = {"total_params": build.count(base), "trainable_params": 0}
    step_fn, state, frozen = build.train_state(run, params, cfg, mesh)
    sizes["trainable_params"] = build.count(state.trainable)
    del base, params

    out = resume or run.output_dir or _default_dir(run.method)
    if is_main():
        os.makedirs(out, exist_ok=True)
        config.save(run, os.path.join(out, "run.yaml"))
    sync("run directory")
    ckpt = Checkpointer(os.path.join(out, "checkpoints"), max_to_keep=run.keep_checkpoints)
    if resume:
        state, position = ckpt.restore(state)
        batches.load_state(position["batches"])
        say(f"resumed {out} at step {int(state.step)}")
    log = MetricsLog(os.path.join(out, "metrics.jsonl"))
    pct = 100 * sizes["trainable_params"] / max(sizes["total_params"], 1)
    say(
        f"{run.method} on {path}: {sizes['total_params']:,} base params, "
        f"{sizes['trainable_params']:,} trainable ({pct:.2f}%); {len(dataset.train)} training "
        f"and {len(dataset.eval)} held-out examples; run directory {out}"
    )

    def evaluate(label: str) -> EvalResult:
        result = evaluator(jpeft.combine(state.trainable, frozen))
        say(f"{label}: {result.summary()}")
        log.write({"step": int(state.step), **result.metrics()})
        return result

    def save(position: dict[str, int]) -> None:
        ckpt.save(state, data={"batches": position})
        ckpt.wait()

    status, times, window = "done", [], _Window()
    with Interrupts() as interrupts:
        before = evaluate("before training") if int(state.step) == 0 else None
        step = int(state.step)
        bar = Progress(run.steps, step)
        while step < run.steps:
            position = batches.state
            batch = next(batches)
            started = time.perf_counter()
            state, metrics = step_fn(state, frozen, shard_batch(local_rows(batch), mesh))
            loss = float(metrics["loss"])
            elapsed = time.perf_counter() - started
            if not math.isfinite(loss):
                save(position)
                bar.close()
                say(
                    f"stopped: the loss is {loss} at step {step + 1}; saved the last good "
                    f"checkpoint (step {step}) in {ckpt.directory}"
                )
                status = "diverged"
                break
            step += 1
            times.append(elapsed)
            compiled = len(times) == 1  # the first step after (re)starting compiles
            window.add(loss, 0 if compiled else int(batch["attention_mask"].sum()), elapsed)
            bar.update(1, loss, window.tokens_per_second())
            if step % run.log_every == 0 or step == run.steps:
                log.write({"step": step, **window.flush(), **_floats(metrics)})
            if run.save_every and step % run.save_every == 0:
                save(batches.state)
            if run.eval_every and step % run.eval_every == 0 and step < run.steps:
                evaluate(f"step {step}")
            if interrupts.requested():
                save(batches.state)
                bar.close()
                say(f"interrupted at step {step}; checkpoint saved in {ckpt.directory}")
                say(f"continue with: jpeft train --resume {out}")
                status = "interrupted"
                break
    bar.close()
    if status != "done":
        log.close()
        ckpt.close()
        return Outcome(status, step, out, before)
    save(batches.state)
    after = evaluate("after training")
    stats = {
        **sizes,
        "step_time_s": float(np.median(times[1:] or times)) if times else None,
        "peak_memory": peak_memory_bytes(),
        "wall_s": time.perf_counter() - started_at,
    }
    trained = jpeft.combine(to_host(state.trainable), frozen)
    finish(out, run, method, trained, cfg, path, before, after, stats)
    log.close()
    ckpt.close()
    return Outcome(status, step, out, before, after)


def _check_batch_sizes(run: RunConfig, mesh: Any) -> None:
    """Batches must split evenly over the mesh's batch axes and the processes."""
    names = RULES["batch"]
    shards = math.prod(mesh.shape[a] for a in ((names,) if isinstance(names, str) else names))
    shards = max(shards, jax.process_count())
    for name in ("batch_size", "eval_batch_size"):
        value = getattr(run, name)
        if value % shards:
            raise ValueError(
                f"{name} {value} must be a multiple of {shards}: the batch is split over the "
                f"mesh axes {names} ({dict(mesh.shape)}) and {jax.process_count()} processes"
            )
    if (run.batch_size // run.grad_accum) % shards:
        raise ValueError(
            f"micro-batches of {run.batch_size // run.grad_accum} rows (batch_size / "
            f"grad_accum) must be a multiple of {shards}, the batch shards of the mesh"
        )


def _default_dir(method: str) -> str:
    """``runs/<method>-<time>``, with one timestamp for all processes."""
    now = np.array(int(time.time()), np.int64)
    if jax.process_count() > 1:
        now = multihost_utils.broadcast_one_to_all(now)
    stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(int(now)))
    return os.path.join("runs", f"{method}-{stamp}")


def _floats(metrics: dict[str, jax.Array]) -> dict[str, float]:
    return {k: float(v) for k, v in metrics.items() if k not in ("loss", "tokens")}


class _Window:
    """Running loss and throughput since the last log line."""

    def __init__(self) -> None:
        self.losses: list[float] = []
        self.tokens, self.seconds = 0, 0.0
        self.rate = 0.0

    def add(self, loss: float, tokens: int, seconds: float) -> None:
        """Count a step; a step with no tokens counted (a compiling one) adds no time."""
        self.losses.append(loss)
        if tokens:
            self.tokens += tokens
            self.seconds += seconds
            self.rate = self.tokens / self.seconds

    def tokens_per_second(self) -> float:
        return self.rate

    def flush(self) -> dict[str, float]:
        out = {"loss": float(np.mean(self.losses)), "tokens_per_second": self.rate}
        self.losses, self.tokens, self.seconds = [], 0, 0.0
        return out
