"""The training loop of ``jpeft train``: set up, run the steps, finish.

The run directory (see :mod:`jpeft.train.run_dir`) holds ``run.yaml``, ``metrics.jsonl``
and TensorBoard events, ``checkpoints/<step>``, ``adapter/`` and ``summary.json``.
Resuming restores the newest checkpoint and the data iterator's position, and the step's
dropout key is derived from the step number, so a resumed run continues exactly as an
uninterrupted one would (:mod:`jpeft.train.resume` refuses options that would not).

The device is never waited for between steps: the next batches are built on a
background thread (:class:`jpeft.train.prefetch.Prefetcher`) and the step metrics are
read only at a *sync point*: every ``log_every`` steps, at checkpoints, evaluations,
the end, and on Ctrl-C or SIGTERM. A non-finite loss or gradient found there stops the
run and saves the last state whose own step was finite: the loss of step k is that of
the params after update k-1, so that is the state after update k-2, rebuilt by
replaying the steps from the newest checkpoint before it.
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
from jpeft.train import build, config, run_dir
from jpeft.train.checkpoint import Checkpointer, CorruptCheckpoint, DiskFull
from jpeft.train.config import RunConfig
from jpeft.train.data import BatchIterator
from jpeft.train.distributed import local_rows, on_main, to_host
from jpeft.train.evaluate import EvalResult, Evaluator
from jpeft.train.interrupt import Interrupts
from jpeft.train.metrics_log import MetricsLog, peak_memory_bytes, rewind, say
from jpeft.train.prepare import load_config_and_tokenizer, load_data, load_weights, packing
from jpeft.train.report import finish
from jpeft.train.resume import check_options, check_steps
from jpeft.train.sharding import RULES, make_mesh, shard_batch
from jpeft.train.steps import Steps

EXIT_CODES = {"done": 0, "diverged": 1, "interrupted": 130, "terminated": 143}


@dataclasses.dataclass(frozen=True)
class Outcome:
    """How a run ended: ``status`` is ``done``, ``interrupted`` (Ctrl-C), ``terminated``
    (SIGTERM) or ``diverged``."""

    status: str
    step: int
    run_dir: str
    before: EvalResult | None = None
    after: EvalResult | None = None

    @property
    def exit_code(self) -> int:
        """0 when done, 1 after a non-finite loss, 130 after Ctrl-C, 143 after SIGTERM."""
        return EXIT_CODES[self.status]


def train(
    run: RunConfig, resume: str | None = None, overwrite: bool = False, fall_back: bool = False
) -> Outcome:
    """Fine-tune ``run.model`` with ``run.method``; ``resume`` is a run directory to continue.

    A new run refuses a non-empty ``run.output_dir`` unless ``overwrite``. With
    ``fall_back`` a resumed run whose newest checkpoint is corrupt continues from the
    newest good one.

    Example:
        >>> import contextlib, io, tempfile
        >>> out = os.path.join(tempfile.mkdtemp(), "run")
        >>> with contextlib.redirect_stdout(io.StringIO()):
        ...     outcome = train(RunConfig(steps=2, eval_samples=4, output_dir=out))
        >>> outcome.status, outcome.step, sorted(os.listdir(os.path.join(out, "adapter")))
        ('done', 2, ['README.md', 'adapter_config.json', 'adapter_model.safetensors',
                     'jpeft_base.json'])
    """
    started_at = time.perf_counter()
    out = resume or run.output_dir or _default_dir(run.method)
    run_dir.check(out, resume=bool(resume), overwrite=overwrite)
    if resume:
        _check_resume(run, out)
    session = _set_up(run, out)
    with Interrupts() as interrupts:
        try:
            session.open(resume=bool(resume), fall_back=fall_back)
            if session.step == 0:
                session.before = session.evaluate("before training")
            steps = Steps(session, interrupts)
            status = steps.run()
            after = session.finish(started_at, steps.times) if status == "done" else None
        finally:
            session.close()
    return Outcome(status, session.step, out, session.before, after)


def _check_resume(run: RunConfig, out: str) -> None:
    """Before anything loads: the options must not change the checkpointed trajectory."""
    with Checkpointer(os.path.join(out, run_dir.CHECKPOINTS)) as ckpt:
        step = ckpt.latest_step()
        if step is None:
            raise FileNotFoundError(f"--resume {out}: no checkpoint in {ckpt.directory}")
        try:
            data = ckpt.data(step) or {}
        except CorruptCheckpoint:
            data = {}  # reported by the restore, which may fall back to an older one
    check_steps(run, step, out)
    allowed = check_options(config.saved(out), run, out, diverged="diverged_at" in data)
    for flag, old, new in allowed:
        say(
            f"continuing after the divergence at step {data['diverged_at']} with {flag} {new} "
            f"(was {old})"
        )


@dataclasses.dataclass
class Session:
    """Everything one ``jpeft train`` process works with, set up before the first step."""

    run: RunConfig
    out: str
    model_path: str
    cfg: Any
    method: jpeft.Method
    evaluator: Evaluator
    batches: BatchIterator
    mesh: Any
    step_fn: Any
    state: Any
    frozen: Any
    sizes: dict[str, int]
    ckpt: Checkpointer | None = None
    log: MetricsLog | None = None
    start: tuple[Any, dict[str, int]] | None = None
    before: EvalResult | None = None

    @property
    def step(self) -> int:
        """The number of updates in ``state``."""
        return int(self.state.step)

    def place(self, batch: dict[str, np.ndarray]) -> dict[str, jax.Array]:
        """This process's rows of a global host batch, as arrays on the mesh."""
        return shard_batch(local_rows(batch), self.mesh)

    def open(self, *, resume: bool, fall_back: bool) -> None:
        """Create (or reopen) the run directory; restore the checkpoint when resuming."""
        run, out = self.run, self.out

        def start() -> None:
            run_dir.start(out, resume=resume)
            config.save(run, os.path.join(out, run_dir.CONFIG))

        on_main(start, "prepare the run directory")
        self.ckpt = Checkpointer(
            os.path.join(out, run_dir.CHECKPOINTS), max_to_keep=run.keep_checkpoints
        )
        self.ckpt.remove_partial()
        metrics = os.path.join(out, run_dir.METRICS)
        if resume:
            self.state, data = self.ckpt.restore(self.state, fall_back=fall_back)
            self.batches.load_state(data["batches"])
            resume_step = self.step
            check_steps(run, resume_step, out)
            redo_eval = resume_step in (0, run.steps)
            on_main(lambda: rewind(metrics, resume_step, redo_eval), "rewind metrics.jsonl")
            say(f"resumed {out} at step {resume_step}")
        self.start = (to_host(self.state), self.batches.state)
        self.log = MetricsLog(metrics, out, purge_step=self.step + 1 if resume else None)
        pct = 100 * self.sizes["trainable_params"] / max(self.sizes["total_params"], 1)
        say(
            f"{run.method} on {self.model_path}: {self.sizes['total_params']:,} base params, "
            f"{self.sizes['trainable_params']:,} trainable ({pct:.2f}%); run directory {out}"
        )

    def evaluate(self, label: str) -> EvalResult:
        """Evaluate the current params, print the result and log it."""
        result = self.evaluator(jpeft.combine(self.state.trainable, self.frozen))
        say(f"{label}: {result.summary()}")
        self.log.write({"step": self.step, **result.metrics()})
        return result

    def save(self, position: dict[str, int], **extra: Any) -> None:
        """Checkpoint the current state with the data position after its last batch."""
        try:
            self.ckpt.save(self.state, data={"batches": position, **extra})
        except DiskFull as err:
            message = f"{err}; free space, then continue: jpeft train --resume {self.out}"
            raise DiskFull(message) from err
        self.log.sync()

    def finish(self, started_at: float, times: list[float]) -> EvalResult:
        """The last checkpoint, the final evaluation, the adapter and ``summary.json``."""
        self.save(self.batches.state)
        after = self.evaluate("after training")
        stats = {
            **self.sizes,
            "step_time_s": float(np.median(times[1:] or times)) if times else None,
            "peak_memory": peak_memory_bytes(),
            "wall_s": time.perf_counter() - started_at,
        }
        trained = jpeft.combine(to_host(self.state.trainable), self.frozen)
        finish(
            self.out,
            self.run,
            self.method,
            trained,
            self.cfg,
            self.model_path,
            self.before,
            after,
            stats,
        )
        return after

    def close(self) -> None:
        """Close the metrics log and the checkpointer (waits for a pending save)."""
        if self.log is not None:
            self.log.close()
        if self.ckpt is not None:
            self.ckpt.close()


def _set_up(run: RunConfig, out: str) -> Session:
    """Load and check the model, the data and the method; build the training state."""
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
    step_fn, state, frozen = build.train_state(run, params, cfg, mesh)
    sizes = {"total_params": build.count(base), "trainable_params": build.count(state.trainable)}
    source = f"split off {run.train_data}" if run.eval_data is None else run.eval_data
    say(f"{len(dataset.train)} training and {len(dataset.eval)} held-out examples ({source})")
    return Session(
        run, out, path, cfg, method, evaluator, batches, mesh, step_fn, state, frozen, sizes
    )


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
