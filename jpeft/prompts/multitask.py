"""peft's multitask prompt tuning (Wang et al. 2023): one soft prompt per task.

The prompt of task ``t`` is ``shared * (cols[t] @ rows[t])``; each batch row names
its task in ``task_ids [B]``, so one jitted forward (or one ``generate`` call)
serves a batch that mixes tasks.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np

from jpeft.adapter_files import WEIGHTS_NAME, AdapterConfig, AdapterTensors
from jpeft.method import Method, register
from jpeft.models.config import LlamaConfig
from jpeft.models.pytree import Params
from jpeft.models.safetensors_io import read_weights
from jpeft.prompts import peft_io
from jpeft.prompts.nodes import MultitaskPrompt, entry_node, install
from jpeft.prompts.prompt_init import (
    PromptInit,
    check_init,
    init_options,
    peft_init_keys,
    start_prompt,
)

# peft's inits from a source-task checkpoint (a multitask adapter trained before)
SOURCE_INITS = ("AVERAGE_SOURCE_TASKS", "EXACT_SOURCE_TASK", "ONLY_SOURCE_SHARED")
# node field -> tensor name in peft's adapter file
_FILE_NAMES = {
    "embedding": peft_io.TABLE,
    "task_cols": "prefix_task_cols",
    "task_rows": "prefix_task_rows",
}


@register
@dataclasses.dataclass(frozen=True)
class MultitaskPromptTuning(PromptInit, Method):
    """peft's multitask prompt tuning (Wang et al. 2023): one prompt per task.

    The prompt of task ``t`` is ``shared * (cols[t] @ rows[t])`` with a shared
    ``[n, hidden]`` embedding and rank-``num_ranks`` task factors (normal, std 0.02).
    Each row picks its task through ``task_ids [B]`` (``model.apply(..., task_ids=...)``;
    a batch may mix tasks). ``prompt_init`` is RANDOM or TEXT (the options of
    :class:`jpeft.prompts.prompt_init.PromptInit`) or one of peft's source-task inits,
    which read a multitask adapter trained before from ``init_state_dict_path`` (its
    ``adapter_model.safetensors``, or the adapter directory), as peft's
    ``MultitaskPromptEmbedding`` does:

    * ``AVERAGE_SOURCE_TASKS``: the source's shared embedding, and its task factors
      averaged over the source tasks (so ``num_tasks`` must be 1);
    * ``EXACT_SOURCE_TASK``: the shared embedding and source task ``init_task``'s
      factors (``num_tasks`` 1);
    * ``ONLY_SOURCE_SHARED``: the shared embedding; the task factors start random.

    Example:
        >>> method = MultitaskPromptTuning(num_virtual_tokens=8, num_tasks=3)
        >>> from jpeft.models import hf, llama
        >>> cfg, base = hf.load_pretrained("assets/tiny-llama")
        >>> params = method.init(jax.random.key(0), base, cfg)
        >>> ids, tasks = jnp.zeros((2, 5), jnp.int32), jnp.array([0, 2])
        >>> llama.Llama(cfg).apply({"params": params}, ids, task_ids=tasks).shape
        (2, 5, 1077)
    """

    peft_type: ClassVar[str] = "MULTITASK_PROMPT_TUNING"

    num_tasks: int = 1
    num_ranks: int = 1
    init_state_dict_path: str | None = None
    init_task: int = 0

    def __post_init__(self) -> None:
        owner = "MultitaskPromptTuning"
        check_init(owner, self, ("RANDOM", "TEXT", *SOURCE_INITS))
        for name in ("num_tasks", "num_ranks"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{owner}: {name}={getattr(self, name)} must be > 0")
        if self.prompt_init in SOURCE_INITS and self.init_state_dict_path is None:
            raise ValueError(
                f"{owner}: prompt_init={self.prompt_init!r} needs init_state_dict_path"
            )
        if self.prompt_init in SOURCE_INITS[:2] and self.num_tasks != 1:
            raise ValueError(
                f"{owner}: prompt_init={self.prompt_init!r} starts one task from the source; "
                f"num_tasks={self.num_tasks}, expected 1 (peft refuses it too)"
            )

    def init(self, key: jax.Array, params: Params, cfg: LlamaConfig) -> Params:
        k_embed, k_cols, k_rows = jax.random.split(key, 3)
        n, t, r = self.num_virtual_tokens, self.num_tasks, self.num_ranks
        fields = {
            "task_cols": 0.02 * jax.random.normal(k_cols, (t, n, r), jnp.float32),
            "task_rows": 0.02 * jax.random.normal(k_rows, (t, r, cfg.hidden_size), jnp.float32),
        }
        if self.prompt_init in SOURCE_INITS:
            fields.update(self._from_source(cfg))
        else:
            fields["embedding"] = start_prompt(self, k_embed, params)
        return install(params, "prompt", MultitaskPrompt(**fields))

    def _from_source(self, cfg: LlamaConfig) -> dict[str, jax.Array]:
        """The node fields a source-task init takes from ``init_state_dict_path``."""
        path = os.fspath(self.init_state_dict_path)
        if os.path.isdir(path):
            path = os.path.join(path, WEIGHTS_NAME)
        if not path.endswith(".safetensors"):
            raise ValueError(
                f"MultitaskPromptTuning: init_state_dict_path={path!r}: expected a .safetensors "
                "file (a peft adapter's adapter_model.safetensors) or an adapter directory"
            )
        source = AdapterTensors(read_weights(path), path)
        n, hidden = self.num_virtual_tokens, cfg.hidden_size
        out = {"embedding": jnp.asarray(source.take(peft_io.TABLE, (n, hidden)))}
        if self.prompt_init == "ONLY_SOURCE_SHARED":
            return out
        cols = source.tensors.get(_FILE_NAMES["task_cols"])
        tasks = 0 if cols is None else cols.shape[0]
        if self.prompt_init == "EXACT_SOURCE_TASK" and not 0 <= self.init_task < tasks:
            raise ValueError(f"{path}: init_task={self.init_task}, the source has {tasks} tasks")
        shapes = {
            "task_cols": (tasks, n, self.num_ranks),
            "task_rows": (tasks, self.num_ranks, hidden),
        }
        for field, shape in shapes.items():
            factors = source.take(_FILE_NAMES[field], shape)
            if self.prompt_init == "AVERAGE_SOURCE_TASKS":
                factors = factors.mean(axis=0, keepdims=True)
            else:
                factors = factors[self.init_task][None]
            out[field] = jnp.asarray(factors)
        return out

    def adapter_config(self, cfg: LlamaConfig) -> dict[str, Any]:
        return {
            "peft_type": self.peft_type,
            **peft_io.model_keys(cfg, self.num_virtual_tokens, prefix=False),
            **peft_init_keys(self),
            "prompt_tuning_init_state_dict_path": self.init_state_dict_path,
            "prompt_tuning_init_task": self.init_task,
            "num_tasks": self.num_tasks,
            "num_ranks": self.num_ranks,
        }

    def adapter_tensors(self, params: Params, cfg: LlamaConfig) -> dict[str, np.ndarray]:
        prompt = entry_node(params, "prompt", (MultitaskPrompt,), "MultitaskPromptTuning")
        return {
            name: np.asarray(getattr(prompt, field), np.float32)
            for field, name in _FILE_NAMES.items()
        }

    @classmethod
    def read_adapter(
        cls, config: AdapterConfig, tensors: AdapterTensors, params: Params, cfg: LlamaConfig
    ) -> tuple[MultitaskPromptTuning, Params]:
        n = peft_io.check_model(config, cfg, prefix=False)
        t, r = config.get("num_tasks", int, 1), config.get("num_ranks", int, 1)
        options = init_options(config)
        options["init_state_dict_path"] = config.get("prompt_tuning_init_state_dict_path", str)
        options["init_task"] = config.get("prompt_tuning_init_task", int, 0)
        if options["prompt_init"] not in ("RANDOM", "TEXT") and (
            options["init_state_dict_path"] is None or t != 1
        ):
            options["prompt_init"] = "RANDOM"  # the trained weights are in the file
        method = cls(num_virtual_tokens=n, num_tasks=t, num_ranks=r, **options)
        shapes = {"embedding": (n, cfg.hidden_size), "task_cols": (t, n, r)}
        shapes["task_rows"] = (t, r, cfg.hidden_size)
        fields = {f: jnp.asarray(tensors.take(_FILE_NAMES[f], s)) for f, s in shapes.items()}
        return method, install(params, "prompt", MultitaskPrompt(**fields))
