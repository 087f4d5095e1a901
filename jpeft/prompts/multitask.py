"""peft's multitask prompt tuning (Wang et al. 2023): one soft prompt per task.

The prompt of task ``t`` is ``shared * (cols[t] @ rows[t])``; each batch row names
its task in ``task_ids [B]``, so one jitted forward (or one ``generate`` call)
serves a batch that mixes tasks.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np

from jpeft.adapter_files import AdapterConfig, AdapterTensors
from jpeft.method import Method, register
from jpeft.models.config import LlamaConfig
from jpeft.models.pytree import Params
from jpeft.prompts import peft_io
from jpeft.prompts.nodes import MultitaskPrompt, entry_node, install
from jpeft.prompts.prompt_init import (
    PromptInit,
    check_init,
    init_options,
    peft_init_keys,
    start_prompt,
)

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
    ``[n, hidden]`` embedding (RANDOM or TEXT init) and rank-``num_ranks`` task
    factors (normal, std 0.02). Each row picks its task through ``task_ids [B]``
    (``model.apply(..., task_ids=...)``; a batch may mix tasks). The other options are
    those of :class:`jpeft.prompts.prompt_init.PromptInit` (SAMPLE_VOCAB excluded).

    Example:
        >>> method = MultitaskPromptTuning(num_virtual_tokens=8, num_tasks=3)
        >>> params = method.init(jax.random.key(0), params, cfg)           # doctest: +SKIP
        >>> logits = model.apply({"params": params}, ids, task_ids=tasks)  # doctest: +SKIP
    """

    peft_type: ClassVar[str] = "MULTITASK_PROMPT_TUNING"

    num_tasks: int = 1
    num_ranks: int = 1

    def __post_init__(self) -> None:
        check_init("MultitaskPromptTuning", self, ("RANDOM", "TEXT"))
        for name in ("num_tasks", "num_ranks"):
            if getattr(self, name) <= 0:
                raise ValueError(f"MultitaskPromptTuning: {name}={getattr(self, name)} must be > 0")

    def init(self, key: jax.Array, params: Params, cfg: LlamaConfig) -> Params:
        k_embed, k_cols, k_rows = jax.random.split(key, 3)
        n, t, r = self.num_virtual_tokens, self.num_tasks, self.num_ranks
        prompt = MultitaskPrompt(
            embedding=start_prompt(self, k_embed, params),
            task_cols=0.02 * jax.random.normal(k_cols, (t, n, r), jnp.float32),
            task_rows=0.02 * jax.random.normal(k_rows, (t, r, cfg.hidden_size), jnp.float32),
        )
        return install(params, "prompt", prompt)

    def adapter_config(self, cfg: LlamaConfig) -> dict[str, Any]:
        return {
            "peft_type": self.peft_type,
            **peft_io.model_keys(cfg, self.num_virtual_tokens, prefix=False),
            **peft_init_keys(self),
            "prompt_tuning_init_state_dict_path": None,
            "prompt_tuning_init_task": 0,
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
        if options["prompt_init"] not in ("RANDOM", "TEXT"):
            options["prompt_init"] = "RANDOM"  # a source-task init; the weights are in the file
        method = cls(num_virtual_tokens=n, num_tasks=t, num_ranks=r, **options)
        shapes = {"embedding": (n, cfg.hidden_size), "task_cols": (t, n, r)}
        shapes["task_rows"] = (t, r, cfg.hidden_size)
        fields = {f: jnp.asarray(tensors.take(_FILE_NAMES[f], s)) for f, s in shapes.items()}
        return method, install(params, "prompt", MultitaskPrompt(**fields))
