"""The end of a finished run: the peft adapter, ``summary.json`` and the terminal report."""

from __future__ import annotations

import os
from typing import Any

import jpeft
from jpeft.model_card import peft_loads
from jpeft.models.atomic import write_json
from jpeft.models.config import LlamaConfig
from jpeft.train.checkpoint import DiskFull, is_disk_full
from jpeft.train.config import RunConfig
from jpeft.train.distributed import on_main
from jpeft.train.evaluate import EvalResult
from jpeft.train.metrics_log import say
from jpeft.train.run_dir import SUMMARY

SAMPLES_SHOWN = 3


def finish(
    out: str,
    run: RunConfig,
    method: jpeft.Method,
    params: dict[str, Any],
    cfg: LlamaConfig,
    model_path: str,
    before: EvalResult | None,
    after: EvalResult,
    stats: dict[str, Any],
) -> dict[str, Any]:
    """Save the adapter (peft's format where peft has the method) and ``summary.json``,
    print where they are and samples.

    ``params``: base plus trained nodes, with the trained arrays on the host.

    Example:
        >>> import tempfile, jax
        >>> from jpeft.models import hf
        >>> cfg, base = hf.load_pretrained("assets/tiny-llama")
        >>> method = jpeft.LoRA(r=2)
        >>> params = method.init(jax.random.key(0), base, cfg)
        >>> stats = {"peak_memory": (0, "host"), "total_params": 100, "trainable_params": 1,
        ...          "step_time_s": 0.1, "wall_s": 1.0}
        >>> out, after = tempfile.mkdtemp(), EvalResult(0.5, 1.65, 1.0, 2, 2)
        >>> summary = finish(out, RunConfig(), method, params, cfg, "assets/tiny-llama",
        ...                  None, after, stats)
        adapter (peft format): .../adapter
        checkpoints: ...
        done in 1s
        >>> summary["after"]["eval_accuracy"], sorted(os.listdir(out))
        (1.0, ['adapter', 'summary.json'])
    """
    adapter = os.path.join(out, "adapter")
    memory, memory_kind = stats["peak_memory"]
    summary = {
        "method": run.method,
        "steps": run.steps,
        "total_params": stats["total_params"],
        "trainable_params": stats["trainable_params"],
        "trainable_percent": 100 * stats["trainable_params"] / max(stats["total_params"], 1),
        "before": None if before is None else _numbers(before),
        "after": _numbers(after),
        "step_time_s": stats["step_time_s"],
        "peak_memory_bytes": memory,
        "peak_memory_kind": memory_kind,
        "adapter": adapter,
        "wall_s": stats["wall_s"],
    }

    def write() -> None:
        try:
            jpeft.save_hf_adapter(adapter, method, params, cfg, base_model_name_or_path=model_path)
            write_json(os.path.join(out, SUMMARY), summary)
        except Exception as err:
            if not is_disk_full(err):
                raise
            raise DiskFull(
                f"no space left on the device while writing {adapter} and {SUMMARY}; the "
                f"trained state is in the last checkpoint: free space, then finish with "
                f"jpeft train --resume {out}",
            ) from err

    on_main(write, "write the adapter")
    own = "jpeft's own format; peft cannot load it"
    say(f"adapter ({'peft format' if peft_loads(method.peft_type) else own}): {adapter}")
    say(f"checkpoints: {os.path.join(out, 'checkpoints')}   metrics: {out}/metrics.jsonl")
    for prompt, output, expected in after.samples[:SAMPLES_SHOWN]:
        mark = "ok" if output == expected.strip() else "wrong"
        say(f"sample: {prompt!r} -> {output!r} (expected {expected!r}: {mark})")
    say(f"done in {stats['wall_s']:.0f}s")
    return summary


def _numbers(result: EvalResult) -> dict[str, Any]:
    return {**result.metrics(), "correct": result.correct, "total": result.total}
