"""Prompt learning: prompt tuning, P-tuning v1/v2, prefix tuning, multitask prompts.

Several named prompt-learning or LLaMA-Adapter adapters in one tree: :mod:`jpeft.prompts.named`.
"""

from jpeft.prompts.methods import PromptTuning, PTuning
from jpeft.prompts.multitask import MultitaskPromptTuning
from jpeft.prompts.named import NamedAdapters
from jpeft.prompts.nodes import MultitaskPrompt, Prefix, ProjectedPrefix, PromptEncoder, SoftPrompt
from jpeft.prompts.prefix import PrefixTuning, PTuningV2

__all__ = [
    "MultitaskPrompt",
    "MultitaskPromptTuning",
    "NamedAdapters",
    "PTuning",
    "PTuningV2",
    "Prefix",
    "PrefixTuning",
    "ProjectedPrefix",
    "PromptEncoder",
    "PromptTuning",
    "SoftPrompt",
]
