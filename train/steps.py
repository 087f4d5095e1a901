"""The steps of a training run: dispatch without waiting, read metrics at sync points,
stop on a signal or a non-finite step with a good checkpoint (see :mod:`jpeft.train.loop`).
"""

from __future__ import annotations

import dataclasses
import math
import time
from typing import TYPE_CHECKING, Any

import jax

from jpeft.train.interrupt import Interrupts
from jpeft.train.metrics_log import Progress, Window, say
from jpeft.train.prefetch import Prefetched, Prefetcher

if TYPE_CHECKING:
    from jpeft.train.loop import Session


@dataclasses.dataclass(frozen=True)
class _Dispatched:
    step: int
    metrics: dict[str, jax.Array]
    item: Prefetched


class Steps:
    """Runs ``session``'s steps up to ``run.steps``; ``run()`` returns the status.

    ``times`` holds the seconds of each step (the first, which compiles, on its own).
    """

    def __init__(self, session: Session, interrupts: Interrupts) -> None:
        self.s, self.interrupts = session, interrupts
        self.times: list[float] = []
        self.window = Window()
        self.first = session.step + 1  # the step that compiles
        self.bar: Progress | None = None
        self.clock = 0.0
        self.last_position = session.batches.state  # after the last step read back

    def run(self) -> str:
        """``done``, ``interrupted``, ``terminated`` or ``diverged``."""
        run, pending = self.s.run, []
        self.bar = Progress(run.steps, self.s.step)
        self.clock = time.perf_counter()
        bad: tuple[int, dict[str, Any]] | None = None
        stop = False
        with self.bar, Prefetcher(self.s.batches, self.s.place) as ahead:
            step = self.s.step
            while step < run.steps and not (bad or stop):
                item = next(ahead)
                self.s.state, metrics = self.s.step_fn(self.s.state, self.s.frozen, item.batch)
                step += 1
                pending.append(_Dispatched(step, metrics, item))
                if self._sync_due(step) or self.interrupts.pending():
                    bad = self._sync(pending)
                    stop = not bad and self._after_sync(pending[-1])
                    pending = []
        self.s.batches.load_state(self.last_position)  # the prefetcher ran ahead
        if bad:
            return self._diverged(*bad)
        return self._interrupted() if stop else "done"

    def _sync_due(self, step: int) -> bool:
        run = self.s.run
        return (
            step == self.first
            or step == run.steps
            or step % run.log_every == 0
            or bool(run.save_every and step % run.save_every == 0)
            or bool(run.eval_every and step % run.eval_every == 0)
        )

    def _sync(self, pending: list[_Dispatched]) -> tuple[int, dict[str, Any]] | None:
        """Read the pending steps' metrics; log them, or return the first non-finite one."""
        host = jax.device_get([d.metrics for d in pending])
        elapsed = time.perf_counter() - self.clock
        for d, m in zip(pending, host, strict=True):
            if not (math.isfinite(m["loss"]) and math.isfinite(m["grad_norm"])):
                return d.step, m
        compiled = pending[0].step == self.first
        seconds = elapsed / len(pending)
        self.times += [elapsed] if compiled else [seconds] * len(pending)
        run = self.s.run
        for d, m in zip(pending, host, strict=True):
            self.window.add(float(m["loss"]), 0 if compiled else d.item.tokens, seconds)
            if d.step % run.log_every == 0 or d.step == run.steps:
                extra = {k: float(v) for k, v in m.items() if k not in ("loss", "tokens")}
                self.s.log.write({"step": d.step, **self.window.flush(), **extra})
        self.bar.update(len(pending), float(host[-1]["loss"]), self.window.rate)
        self.last_position = pending[-1].item.position
        return None

    def _after_sync(self, last: _Dispatched) -> bool:
        """Checkpoint, evaluate, and whether a signal asks to stop (after saving)."""
        run, step = self.s.run, last.step
        stop = self.interrupts.requested()
        if stop or (run.save_every and step % run.save_every == 0):
            self.s.save(last.item.position)
        if run.eval_every and step % run.eval_every == 0 and step < run.steps and not stop:
            self.s.evaluate(f"step {step}")
        self.clock = time.perf_counter()  # saving and evaluating are not step time
        return stop

    def _interrupted(self) -> str:
        signal = self.interrupts.signal
        status = "terminated" if signal is not None and signal.name == "SIGTERM" else "interrupted"
        say(f"{status} at step {self.s.step}; checkpoint saved in {self.s.ckpt.directory}")
        say(f"continue with: jpeft train --resume {self.s.out}")
        return status

    def _diverged(self, step: int, metrics: dict[str, Any]) -> str:
        """Stop: save the state before the update that led to step ``step``'s non-finite
        loss or gradient (rebuilt by replaying steps), and say so."""
        loss, norm = float(metrics["loss"]), float(metrics["grad_norm"])
        what = f"the loss is {loss}" if not math.isfinite(loss) else f"the gradient norm is {norm}"
        good = self._rebuild(step - 2, diverged_at=step)
        if good is None:
            say(
                f"stopped: {what} at step {step}; no earlier state to save (the model or the "
                "data gives a non-finite loss before any update)"
            )
        else:
            say(
                f"stopped: {what} at step {step}; saved the last good checkpoint (step {good}) "
                f"in {self.s.ckpt.directory}"
            )
            say(f"continue with a lower learning rate: jpeft train --resume {self.s.out} --lr LR")
        return "diverged"

    def _rebuild(self, target: int, diverged_at: int) -> int | None:
        """Restore the newest saved state at or before ``target`` (a checkpoint or the
        run's start), replay the steps up to ``target`` and save it; None if none exists."""
        ckpt, s = self.s.ckpt, self.s
        start_state, start_position = s.start
        saved = [k for k in ckpt.all_steps() if k <= target]
        if target < 0 or not (saved or int(start_state.step) <= target):
            return None
        if saved and saved[-1] >= int(start_state.step):
            s.state, data = ckpt.restore(s.state, saved[-1])
            position = data["batches"]
        else:
            shardings = jax.tree.map(lambda x: x.sharding, s.state)
            s.state, position = jax.device_put(start_state, shardings), start_position
        for step in ckpt.all_steps():
            if step >= target:  # bad (after the target), or saved again below with the mark
                ckpt.delete(step)
        s.batches.load_state(position)
        for _ in range(target - s.step):
            s.state, _metrics = s.step_fn(s.state, s.frozen, s.place(next(s.batches)))
        s.save(s.batches.state, diverged_at=diverged_at)
        return target
