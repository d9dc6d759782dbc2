"""Megatron-style decoder LLM with Qwen2 / Llama-compatible weights (see model.py for the layout)."""

from modeling.llm.attention import KVCache
from modeling.llm.config import LLMConfig
from modeling.llm.generation import generate
from modeling.llm.model import DecoderLM, LMOutput

__all__ = ["DecoderLM", "KVCache", "LLMConfig", "LMOutput", "generate"]
