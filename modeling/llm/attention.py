"""Self-attention with a fused QKV projection, rotary embeddings, grouped-query attention and packed rows.

Layouts (Megatron): `linear_qkv` produces, for each of the `num_kv_heads` query groups, [its num_heads/num_kv_heads
query heads, 1 key head, 1 value head], each `head_dim` wide. Query head h uses key/value head
h // (num_heads / num_kv_heads), as in transformers' `repeat_kv`.

Packed rows: `segment_ids` [B, S] label each position with its sample (0 = padding); a sample is a contiguous run
of equal ids. Attention stays inside a run and is causal: on CPU (and in fp32) SDPA gets a block-diagonal causal
bool mask; on CUDA in bf16/fp16 a varlen kernel (flash-attn when installed, else torch's
`torch.nn.attention.varlen`) gets the runs as `cu_seqlens`. All give the same result.
"""

from __future__ import annotations

import functools
import importlib.util
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from modeling.layers import NormalInitLinear
from modeling.llm.config import LLMConfig


@functools.cache
def flash_attn_available() -> bool:
    return importlib.util.find_spec("flash_attn") is not None


def rotary_cos_sin(
    position_ids: torch.Tensor, head_dim: int, theta: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """RoPE tables [B, S, head_dim] in fp32: inv_freq_i = theta^(-2i/d), angle = pos * inv_freq, the half-size
    angles repeated twice (transformers' rotate-half convention, also Megatron's)."""
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64, device=position_ids.device).float() / head_dim
    inv_freq = 1.0 / (theta**exponents)
    angles = position_ids.float()[..., None] * inv_freq
    angles = torch.cat((angles, angles), dim=-1)
    return angles.cos(), angles.sin()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, H, S, D], cos/sin [B, S, D]: x * cos + rotate_half(x) * sin, rotate_half(x) = [-x2, x1]."""
    cos = cos[:, None].to(x.dtype)
    sin = sin[:, None].to(x.dtype)
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


def _run_starts(segment_ids: torch.Tensor) -> torch.Tensor:
    """[B, S] bool, True where a contiguous run of equal segment ids begins."""
    change = torch.ones_like(segment_ids, dtype=torch.bool)
    change[:, 1:] = segment_ids[:, 1:] != segment_ids[:, :-1]
    return change


def segment_runs(segment_ids: torch.Tensor) -> torch.Tensor:
    """[B, S] segment ids -> [B, S] run index (1, 2, ...) that increases wherever the id changes."""
    return _run_starts(segment_ids).long().cumsum(dim=-1)


def positions_from_segments(segment_ids: torch.Tensor) -> torch.Tensor:
    """[B, S] segment ids -> positions restarting at 0 at the start of every contiguous run."""
    seq_len = segment_ids.shape[1]
    index = torch.arange(seq_len, device=segment_ids.device).expand_as(segment_ids)
    change = _run_starts(segment_ids)
    run_start = torch.cummax(torch.where(change, index, 0), dim=-1).values
    return index - run_start


@functools.cache
def torch_varlen_available() -> bool:
    """torch's own varlen flash attention (`torch.nn.attention.varlen`, torch >= 2.10; CUDA only)."""
    return importlib.util.find_spec("torch.nn.attention.varlen") is not None


@dataclass
class AttentionMask:
    """How a forward attends, computed once per forward and shared by all layers.

    `varlen` None: SDPA, with `mask` a bool [B, 1, S_q, S_k] (True = attend) or None with `is_causal`.
    `varlen` "flash_attn" or "torch": one varlen kernel call over the flattened B*S tokens, each contiguous run of
    equal segment ids (each row, without segment ids) one causal sequence: `cu_seqlens` int32 [num_runs + 1] and
    `max_seqlen`. On CUDA this replaces the bool block mask, which sends SDPA to its math kernel (fp32 S x S
    scores per head).
    """

    varlen: str | None = None
    mask: torch.Tensor | None = None
    is_causal: bool = False
    cu_seqlens: torch.Tensor | None = None
    max_seqlen: int = 0

    @classmethod
    def build(
        cls,
        backend: str,
        batch: int,
        q_len: int,
        past_len: int,
        segment_ids: torch.Tensor | None,
        device: torch.device,
        dtype: torch.dtype,
    ) -> AttentionMask:
        varlen = _varlen_kernel(backend, device, dtype, past_len)
        if varlen is not None:
            return cls.packed(varlen, batch, q_len, segment_ids, device)
        if segment_ids is not None:
            runs = segment_runs(segment_ids)
            causal = torch.ones(q_len, q_len, dtype=torch.bool, device=device).tril()
            return cls(mask=((runs[:, :, None] == runs[:, None, :]) & causal)[:, None])
        if past_len == 0:
            return cls(is_causal=q_len > 1)
        if q_len == 1:
            return cls()
        causal = torch.ones(q_len, past_len + q_len, dtype=torch.bool, device=device).tril(diagonal=past_len)
        return cls(mask=causal[None, None])

    @classmethod
    def packed(
        cls, varlen: str, batch: int, q_len: int, segment_ids: torch.Tensor | None, device: torch.device
    ) -> AttentionMask:
        """The varlen layout: cumulative run lengths over the flattened [B * S] tokens."""
        if segment_ids is None:
            runs = torch.arange(batch, device=device)[:, None].expand(batch, q_len)
        else:
            runs = segment_runs(segment_ids) + torch.arange(batch, device=device)[:, None] * (q_len + 1)
        _, lengths = torch.unique_consecutive(runs.reshape(-1), return_counts=True)
        cu_seqlens = F.pad(lengths.cumsum(0), (1, 0)).to(torch.int32)
        return cls(varlen=varlen, cu_seqlens=cu_seqlens, max_seqlen=int(lengths.max()))


def _varlen_kernel(backend: str, device: torch.device, dtype: torch.dtype, past_len: int) -> str | None:
    """'flash_attn', 'torch' or None (SDPA). `auto` takes flash-attn when installed, else torch's varlen kernel,
    on CUDA in fp16/bf16 without a KV cache; SDPA everywhere else (CPU, fp32, generation with a cache)."""
    on_gpu = device.type == "cuda" and dtype in (torch.float16, torch.bfloat16)
    if backend == "flash" and past_len == 0 and not (flash_attn_available() and on_gpu):
        raise ValueError(
            "attention_backend='flash' needs the flash_attn package, CUDA tensors and fp16/bf16; got "
            f"flash_attn installed={flash_attn_available()}, device={device.type}, dtype={dtype}. "
            "Use attention_backend='auto', 'varlen' or 'sdpa'."
        )
    if backend == "varlen" and past_len == 0 and not (torch_varlen_available() and on_gpu):
        raise ValueError(
            "attention_backend='varlen' needs torch.nn.attention.varlen (torch >= 2.10), CUDA tensors and "
            f"fp16/bf16; got device={device.type}, dtype={dtype}. Use attention_backend='auto' or 'sdpa'."
        )
    if past_len or not on_gpu or backend == "sdpa":
        return None
    if backend in ("flash", "auto") and flash_attn_available():
        return "flash_attn"
    if backend in ("varlen", "auto") and torch_varlen_available():
        return "torch"
    return None


class KVCache:
    """Keys and values of the positions seen so far, per layer: [B, H_kv, T, head_dim]."""

    def __init__(self, num_layers: int) -> None:
        self.keys: list[torch.Tensor | None] = [None] * num_layers
        self.values: list[torch.Tensor | None] = [None] * num_layers

    @property
    def length(self) -> int:
        return 0 if self.keys[0] is None else self.keys[0].shape[2]

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.keys[layer] is not None:
            k = torch.cat((self.keys[layer], k), dim=2)
            v = torch.cat((self.values[layer], v), dim=2)
        self.keys[layer], self.values[layer] = k, v
        return k, v


class SelfAttention(nn.Module):
    """x [B, S, C] -> [B, S, C]: softmax(q k^T / sqrt(d) + mask) v per head, q and k rotated by RoPE."""

    def __init__(self, config: LLMConfig, layer_index: int) -> None:
        super().__init__()
        self.layer_index = layer_index
        self.head_dim = config.head_dim
        self.num_heads = config.num_heads
        self.num_kv_heads = config.num_kv_heads
        qkv_size = (config.num_heads + 2 * config.num_kv_heads) * config.head_dim
        self.linear_qkv = NormalInitLinear(config.hidden_size, qkv_size, config.qkv_bias, config.init_std)
        self.linear_proj = NormalInitLinear(
            config.num_heads * config.head_dim, config.hidden_size, False, config.output_init_std
        )

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        attention_mask: AttentionMask,
        kv_cache: KVCache | None = None,
    ) -> torch.Tensor:
        batch, seq_len, _ = x.shape
        heads_per_group = self.num_heads // self.num_kv_heads
        qkv = self.linear_qkv(x).view(batch, seq_len, self.num_kv_heads, heads_per_group + 2, self.head_dim)
        q = qkv[:, :, :, :heads_per_group].reshape(batch, seq_len, self.num_heads, self.head_dim)
        k, v = qkv[:, :, :, heads_per_group], qkv[:, :, :, heads_per_group + 1]
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if kv_cache is not None:
            k, v = kv_cache.update(self.layer_index, k, v)
        if attention_mask.varlen is not None:
            out = self._varlen(q, k, v, attention_mask)
        else:
            out = F.scaled_dot_product_attention(
                q,
                k,
                v,
                attn_mask=attention_mask.mask,
                is_causal=attention_mask.is_causal,
                enable_gqa=self.num_kv_heads != self.num_heads,
            ).transpose(1, 2)
        return self.linear_proj(out.reshape(batch, seq_len, self.num_heads * self.head_dim))

    def _varlen(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attention_mask: AttentionMask
    ) -> torch.Tensor:
        """Causal varlen attention over the flattened tokens (flash-attn or torch's kernel): [B, H, S, D] ->
        [B, S, H, D]."""
        batch, num_heads, seq_len, head_dim = q.shape
        q, k, v = (t.transpose(1, 2).reshape(batch * seq_len, t.shape[1], head_dim) for t in (q, k, v))
        cu, max_len = attention_mask.cu_seqlens, attention_mask.max_seqlen
        if attention_mask.varlen == "flash_attn":
            from flash_attn import flash_attn_varlen_func

            out = flash_attn_varlen_func(q, k, v, cu, cu, max_len, max_len, causal=True)
        else:
            from torch.nn.attention.varlen import varlen_attn

            out = varlen_attn(
                q,
                k,
                v,
                cu,
                cu,
                max_len,
                max_len,
                window_size=(-1, 0),
                enable_gqa=self.num_kv_heads != self.num_heads,
            )
        return out.view(batch, seq_len, num_heads, head_dim)
