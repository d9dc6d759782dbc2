"""LLMConfig: the shape of the Megatron-style decoder (Qwen2 / Llama compatible)."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

AttentionBackend = Literal["auto", "sdpa", "flash", "varlen"]


@dataclass
class LLMConfig:
    """Decoder-only transformer: embedding, `num_layers` x (RMSNorm -> GQA attention with fused QKV and RoPE,
    RMSNorm -> SwiGLU MLP with fused gate/up), final RMSNorm, LM head (tied to the embedding or not).

    `num_kv_heads` = `num_heads` is multi-head attention, fewer is grouped-query attention (Megatron's
    `num_query_groups`). `attention_backend`: "sdpa" (torch SDPA with a block mask), "flash" (flash-attn
    varlen), "varlen" (torch's varlen flash kernel), both CUDA and fp16/bf16 only; "auto" (flash-attn when
    installed, else torch's varlen kernel, on CUDA in fp16/bf16; SDPA otherwise). `tensor_parallel_size` > 1 builds megatron-core
    tensor-parallel layers (see modeling/llm/tensor_parallel.py for what is supported).
    """

    vocab_size: int = 512
    hidden_size: int = 64
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 2
    intermediate_size: int = 128
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 4096
    qkv_bias: bool = True
    tie_embeddings: bool = True
    init_std: float = 0.02
    activation_checkpointing: bool = False
    tensor_parallel_size: int = 1
    attention_backend: AttentionBackend = "auto"

    def __post_init__(self) -> None:
        self.validate()

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    def validate(self) -> None:
        """Raise ValueError naming the option when the shape is inconsistent."""
        for name in (
            "vocab_size",
            "hidden_size",
            "num_layers",
            "num_heads",
            "num_kv_heads",
            "intermediate_size",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"LLMConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"LLMConfig.hidden_size ({self.hidden_size}) must be divisible by num_heads ({self.num_heads})"
            )
        if self.head_dim % 2:
            raise ValueError(
                f"LLMConfig head_dim = hidden_size / num_heads must be even for RoPE, got {self.head_dim}"
            )
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"LLMConfig.num_heads ({self.num_heads}) must be divisible by num_kv_heads ({self.num_kv_heads})"
            )
        if self.attention_backend not in ("auto", "sdpa", "flash", "varlen"):
            raise ValueError(
                "LLMConfig.attention_backend must be 'auto', 'sdpa', 'flash' or 'varlen', got "
                f"{self.attention_backend!r}"
            )
        tp = self.tensor_parallel_size
        if tp < 1:
            raise ValueError(f"LLMConfig.tensor_parallel_size must be >= 1, got {tp}")
        for name in ("num_kv_heads", "vocab_size", "intermediate_size"):
            if getattr(self, name) % tp:
                raise ValueError(
                    f"LLMConfig.{name} ({getattr(self, name)}) must be divisible by tensor_parallel_size ({tp})"
                )

    def to_json(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(dataclasses.asdict(self), indent=2) + "\n")

    @classmethod
    def from_json(cls, path: str | Path, **overrides) -> LLMConfig:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"LLM config not found: {path}")
        data = json.loads(path.read_text())
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(
                f"{path}: unknown LLMConfig fields {unknown}; expected a subset of {sorted(known)}"
            )
        data.update(overrides)
        return cls(**data)
