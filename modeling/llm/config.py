"""LLMConfig: the shape of the Megatron-style decoder (Qwen2 / Llama compatible)."""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Literal

AttentionBackend = Literal["auto", "sdpa", "flash", "varlen"]


@dataclass
class LLMConfig:
    """Decoder-only transformer: embedding, `num_layers` x (RMSNorm -> GQA attention with fused QKV and RoPE,
    RMSNorm -> SwiGLU MLP with fused gate/up), final RMSNorm, LM head (tied to the embedding or not).

    `num_kv_heads` = `num_heads` is multi-head attention, fewer is grouped-query attention (Megatron's
    `num_query_groups`). `attention_backend`: "sdpa" (torch SDPA with a block mask), "flash" (flash-attn
    varlen), "varlen" (torch's varlen flash kernel), both CUDA and fp16/bf16 only; "auto" (flash-attn when
    installed, else torch's varlen kernel, on CUDA in fp16/bf16; SDPA otherwise).
    """

    # Options that older versions had -> why they are gone. `without_removed_defaults` drops them from saved
    # configs where they had their no-op value; any other value gets this message.
    REMOVED_OPTIONS: ClassVar[dict[str, str]] = {
        "tensor_parallel_size": "tensor parallelism was removed (training parallelism is DeepSpeed ZeRO-3 data "
        "parallelism); drop tensor_parallel_size from the config",
    }
    REMOVED_DEFAULTS: ClassVar[dict[str, object]] = {"tensor_parallel_size": 1}

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
    attention_backend: AttentionBackend = "auto"

    def __post_init__(self) -> None:
        self.validate()

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def output_init_std(self) -> float:
        """Init std of the output projections (attention out, MLP down): init_std / sqrt(2 num_layers), Megatron's
        `output_layer_init_method`."""
        return self.init_std / math.sqrt(2.0 * self.num_layers)

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

    @classmethod
    def without_removed_defaults(cls, data: dict, source: str) -> dict:
        """A saved config (llm_config.json, the model.llm section of a checkpoint's or export's run config) without
        the removed options that older versions wrote at their no-op value; ValueError naming `source` and the
        option when one is set to anything else."""
        data = {
            k: v for k, v in data.items() if k not in cls.REMOVED_DEFAULTS or v != cls.REMOVED_DEFAULTS[k]
        }
        removed = sorted(set(data) & set(cls.REMOVED_OPTIONS))
        if removed:
            raise ValueError(f"{source}: LLMConfig.{removed[0]}: {cls.REMOVED_OPTIONS[removed[0]]}")
        return data

    def to_json(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(dataclasses.asdict(self), indent=2) + "\n")

    @classmethod
    def from_json(cls, path: str | Path, **overrides) -> LLMConfig:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"LLM config not found: {path}")
        data = cls.without_removed_defaults(json.loads(path.read_text()), str(path))
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(
                f"{path}: unknown LLMConfig fields {unknown}; expected a subset of {sorted(known)}"
            )
        data.update(overrides)
        return cls(**data)
