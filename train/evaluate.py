"""Evaluation: held-out loss and perplexity, and task accuracy by greedy generation.

The loss goes through :func:`jpeft.train.step.eval_step`, the same path as the API's.
Accuracy is exact match (``jpeft.train.data.exact_match``) between the greedy continuation of
each record's prompt, cut at the end-of-sequence token, and the record's reference
answer. All prompts are left-padded to one length and batches keep one size, so each
of the two programs compiles once per tree structure of the params. A multi-adapter or
multi-task model is evaluated with one adapter or task for every row (``row_ids``).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from jpeft.models import context, generate, llama
from jpeft.models.config import LlamaConfig
from jpeft.models.pytree import Params
from jpeft.models.tokenizer import Tokenizer
from jpeft.partition import split
from jpeft.train import data
from jpeft.train.distributed import local_rows, to_host
from jpeft.train.sharding import shard_batch
from jpeft.train.state import TrainState
from jpeft.train.step import EXAMPLE_KEYS, eval_step


@dataclasses.dataclass(frozen=True)
class EvalResult:
    """One evaluation. ``loss``/``perplexity`` are None without eval examples, ``accuracy``
    is None without instruction records; ``samples`` are (prompt, output, expected)."""

    loss: float | None
    perplexity: float | None
    accuracy: float | None
    correct: int
    total: int
    samples: tuple[tuple[str, str, str], ...] = ()

    def summary(self) -> str:
        """One line for the terminal.

        Example:
            >>> EvalResult(0.5, 1.65, 0.9, 9, 10).summary()
            'eval loss 0.5000  perplexity 1.65  accuracy 90.0% (9/10)'
        """
        parts = []
        if self.loss is not None:
            parts.append(f"eval loss {self.loss:.4f}  perplexity {self.perplexity:.2f}")
        if self.accuracy is not None:
            parts.append(f"accuracy {100 * self.accuracy:.1f}% ({self.correct}/{self.total})")
        return "  ".join(parts) or "nothing to evaluate"

    def metrics(self) -> dict[str, float]:
        """The numbers for the metrics log."""
        out = {"eval_loss": self.loss, "eval_perplexity": self.perplexity}
        out["eval_accuracy"] = self.accuracy
        return {k: v for k, v in out.items() if v is not None}


class Evaluator:
    """Evaluates params on fixed held-out data (batches built once, on the host).

    ``row_ids`` (``{"task_ids": t}`` or ``{"adapter_ids": a}``) gives every row that
    task or adapter, in the loss batches and in generation.

    Example:
        >>> from jpeft.models import hf
        >>> from jpeft.train.config import RunConfig
        >>> from jpeft.train.prepare import load_data
        >>> from jpeft.train.sharding import make_mesh
        >>> cfg, params = hf.load_pretrained("assets/tiny-llama")
        >>> tok = Tokenizer.from_dir("assets/tiny-llama")
        >>> ds = load_data(RunConfig(), tok, cfg)
        >>> ev = Evaluator(cfg, tok, ds.eval[:8], ds.eval_records[:2], mesh=make_mesh(),
        ...                batch_size=8, seq_len=64, max_new_tokens=4)
        >>> print(ev(params).summary())  # the untrained bundled model
        eval loss ... accuracy 0.0% (0/2)
    """

    def __init__(
        self,
        cfg: LlamaConfig,
        tokenizer: Tokenizer,
        examples: Sequence[data.Example],
        records: Sequence[data.Record],
        *,
        mesh: Mesh,
        batch_size: int,
        seq_len: int,
        packing: bool = True,
        max_samples: int = 200,
        max_new_tokens: int | None = None,
        compute_dtype: Any = jnp.float32,
        row_ids: dict[str, int] | None = None,
    ) -> None:
        self.cfg, self.tokenizer, self.mesh = cfg, tokenizer, mesh
        self.dtype = context.compute_dtype(compute_dtype)
        self.batch_size = batch_size
        self.row_ids = _row_ids(row_ids or {}, batch_size)
        self.loss_batches = []
        if examples:
            it = data.BatchIterator(
                examples,
                batch_size=batch_size,
                seq_len=seq_len,
                packing=packing,
                shuffle=False,
                pad_id=_pad(tokenizer),
            )
            self.loss_batches = [{**b, **self.row_ids} for b in it.epoch_batches()]
        self.records = list(records[:max_samples])
        self.prompts = [data.generation_prompt(tokenizer, r) for r in self.records]
        answers = [
            len(data.encode_record(tokenizer, r)) - len(p)
            for r, p in zip(self.records, self.prompts, strict=True)
        ]
        self.max_new_tokens = max_new_tokens or max(answers, default=1) + 1
        self.apply_fn = llama.Llama(cfg, dtype=self.dtype).apply
        self._eval = jax.jit(eval_step)

    def generation_length(self) -> int:
        """Longest prompt plus ``max_new_tokens``: the context generation needs."""
        return max((len(p) for p in self.prompts), default=0) + self.max_new_tokens

    def loss(self, params: Params) -> tuple[float | None, float | None]:
        """``(mean target loss, perplexity)`` over the eval examples."""
        if not self.loss_batches:
            return None, None
        trainable, frozen = split(params)
        state = TrainState(
            step=jnp.zeros((), jnp.int32),
            trainable=trainable,
            opt_state=None,
            rng=None,
            apply_fn=self.apply_fn,
            tx=None,
        )  # what eval_step reads: the model and the trainable part
        total, count = 0.0, 0.0
        for batch in self.loss_batches:
            metrics = self._eval(state, frozen, shard_batch(local_rows(batch), self.mesh))
            s, n = to_host((metrics["loss_sum"], metrics["tokens"]))
            total, count = total + float(s), count + float(n)
        mean = total / max(count, 1.0)
        return mean, math.exp(min(mean, 50.0))

    def generate(self, params: Params, prompts: Sequence[Sequence[int]]) -> list[str]:
        """Greedy continuations of token-id prompts, decoded and cut at end-of-sequence.

        Example:
            >>> from jpeft.models import hf
            >>> from jpeft.train.sharding import make_mesh
            >>> cfg, params = hf.load_pretrained("assets/tiny-llama")
            >>> tok = Tokenizer.from_dir("assets/tiny-llama")
            >>> ev = Evaluator(cfg, tok, [], [], mesh=make_mesh(), batch_size=2, seq_len=32,
            ...                max_new_tokens=3)
            >>> [text] = ev.generate(params, [tok.encode("[INST] Sort: 3 1 [/INST]")])
            >>> isinstance(text, str)
            True
        """
        width = max(len(p) for p in self.prompts + [list(p) for p in prompts])
        outputs = []
        for start in range(0, len(prompts), self.batch_size):
            chunk = list(prompts[start : start + self.batch_size])
            ids, mask = generate.left_pad(chunk, _pad(self.tokenizer), self.batch_size, width)
            result = generate.generate(
                params,
                self.cfg,
                ids,
                mask,
                max_new_tokens=self.max_new_tokens,
                stop_tokens=_stops(self.tokenizer, self.cfg),
                pad_token_id=_pad(self.tokenizer),
                dtype=self.dtype,
                **self.row_ids,
            )
            tokens, lengths = to_host((result.tokens, result.lengths))
            for row in range(len(chunk)):
                outputs.append(self.tokenizer.decode(tokens[row, : lengths[row]]))
        return outputs

    def accuracy(self, params: Params) -> tuple[float | None, int, list[tuple[str, str, str]]]:
        """``(exact-match accuracy, correct, [(prompt, output, expected)])`` on the records."""
        if not self.records:
            return None, 0, []
        outputs = self.generate(params, self.prompts)
        samples, correct = [], 0
        for record, prompt, output in zip(self.records, self.prompts, outputs, strict=True):
            expected = data.reference_answer(record)
            correct += data.exact_match(output, expected)
            samples.append((self.tokenizer.decode(prompt), output.strip(), expected))
        return correct / len(self.records), correct, samples

    def __call__(self, params: Params) -> EvalResult:
        """Loss, perplexity and accuracy of ``params``."""
        loss, ppl = self.loss(params)
        acc, correct, samples = self.accuracy(params)
        return EvalResult(loss, ppl, acc, correct, len(self.records), tuple(samples))


def _pad(tokenizer: Tokenizer) -> int:
    return tokenizer.pad_id if tokenizer.pad_id is not None else 0


def _stops(tokenizer: Tokenizer, cfg: LlamaConfig) -> tuple[int, ...]:
    return (tokenizer.eos_id,) if tokenizer.eos_id is not None else cfg.eos_ids


def _row_ids(ids: dict[str, int], batch_size: int) -> dict[str, np.ndarray]:
    """``{"adapter_ids" | "task_ids": int32 [batch_size]}``: one id for every row."""
    unknown = sorted(set(ids) - set(EXAMPLE_KEYS))
    if unknown:
        raise ValueError(f"row_ids: unknown keys {unknown}; valid keys are {list(EXAMPLE_KEYS)}")
    return {key: np.full((batch_size,), value, np.int32) for key, value in ids.items()}
