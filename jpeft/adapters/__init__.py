"""Adapter tuning: bottleneck adapters and LLaMA-Adapter (adaption prompts)."""

from jpeft.adapters.bottleneck import Adapter, BottleneckAdapter
from jpeft.adapters.llama_adapter import AdaptionPrompt, LlamaAdapter

__all__ = ["Adapter", "AdaptionPrompt", "BottleneckAdapter", "LlamaAdapter"]
