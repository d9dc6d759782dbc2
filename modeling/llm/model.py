"""DecoderLM: a Megatron-style decoder-only transformer whose weights map one-to-one onto Qwen2 / Llama.

Parameter names follow megatron-core's local GPT layer spec:
  embedding.word_embeddings.weight                         [V, C]
  decoder.layers.{i}.input_layernorm.weight                [C]
  decoder.layers.{i}.self_attention.linear_qkv.{weight,bias} [(H + 2 H_kv) d, C]  (per-group [q..q, k, v])
  decoder.layers.{i}.self_attention.linear_proj.weight     [C, H d]
  decoder.layers.{i}.pre_mlp_layernorm.weight              [C]
  decoder.layers.{i}.mlp.linear_fc1.weight                 [2 I, C]  ([gate; up])
  decoder.layers.{i}.mlp.linear_fc2.weight                 [C, I]
  decoder.final_layernorm.weight                           [C]
  output_layer.weight                                      [V, C]   (absent when tied)

Layer i: h = x + Attn(RMSNorm(x)); y = h + W2 (silu(W_gate RMSNorm(h)) * W_up RMSNorm(h)).
Our on-disk format is `llm_config.json` + `model.safetensors` (the state dict); training/hf_convert.py reads and
writes transformers' layout.
"""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn
from torch.utils.checkpoint import checkpoint

from modeling.kernels import CrossEntropyTotals, linear_cross_entropy
from modeling.layers import NormalInitEmbedding, NormalInitLinear
from modeling.llm.attention import (
    AttentionMask,
    KVCache,
    SelfAttention,
    positions_from_segments,
    rotary_cos_sin,
)
from modeling.llm.config import LLMConfig

CONFIG_FILE = "llm_config.json"
WEIGHTS_FILE = "model.safetensors"
RUNTIME_OPTIONS = {"activation_checkpointing", "attention_backend"}


class LinearHead(NormalInitLinear):
    """A bias-free classifier head, weight [V, C]: forward(hidden [..., C]) -> logits [..., V]; with labels [...]
    (-100 = no loss) -> CrossEntropyTotals of softmax CE by the fused linear CE, never materialising the logits.
    The loss runs in this module's own forward, so that ZeRO-3 gathers the weight for it as for the logits."""

    def __init__(self, in_features: int, out_features: int, init_std: float) -> None:
        super().__init__(in_features, out_features, False, init_std)

    def forward(self, hidden: torch.Tensor, labels: torch.Tensor | None = None):
        if labels is None:
            return super().forward(hidden)
        return linear_cross_entropy(hidden.reshape(-1, hidden.shape[-1]), self.weight, labels.reshape(-1))


class LMOutput(NamedTuple):
    """logits [B, S, V] (None from a with_logits=False forward); hidden_states [B, S, C] after the final norm;
    kv_cache when one was passed in.
    A NamedTuple so that DeepSpeed ZeRO-3 sees its tensors and hooks the backward pass."""

    logits: torch.Tensor | None
    hidden_states: torch.Tensor
    kv_cache: KVCache | None = None


class MLP(nn.Module):
    """SwiGLU: x [B, S, C] -> fc2(silu(gate) * up), [gate; up] = fc1(x)."""

    def __init__(self, config: LLMConfig) -> None:
        super().__init__()
        self.linear_fc1 = NormalInitLinear(
            config.hidden_size, 2 * config.intermediate_size, False, config.init_std
        )
        self.linear_fc2 = NormalInitLinear(
            config.intermediate_size, config.hidden_size, False, config.output_init_std
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.linear_fc1(x).chunk(2, dim=-1)
        return self.linear_fc2(F.silu(gate) * up)


class TransformerLayer(nn.Module):
    def __init__(self, config: LLMConfig, layer_index: int) -> None:
        super().__init__()
        self.input_layernorm = nn.RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.self_attention = SelfAttention(config, layer_index)
        self.pre_mlp_layernorm = nn.RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.mlp = MLP(config)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        attention_mask: AttentionMask,
        kv_cache: KVCache | None = None,
    ) -> torch.Tensor:
        x = x + self.self_attention(self.input_layernorm(x), cos, sin, attention_mask, kv_cache)
        return x + self.mlp(self.pre_mlp_layernorm(x))


class TransformerBlock(nn.Module):
    """The layer stack and the final norm (Megatron's `decoder`)."""

    def __init__(self, config: LLMConfig) -> None:
        super().__init__()
        self.layers = nn.ModuleList(TransformerLayer(config, i) for i in range(config.num_layers))
        self.final_layernorm = nn.RMSNorm(config.hidden_size, eps=config.rms_norm_eps)


class DecoderLM(nn.Module):
    def __init__(self, config: LLMConfig) -> None:
        super().__init__()
        config.validate()
        self.config = config
        self.embedding = nn.Module()
        self.embedding.word_embeddings = NormalInitEmbedding(
            config.vocab_size, config.hidden_size, config.init_std
        )
        self.decoder = TransformerBlock(config)
        # The LM head [V, C]; None when tied (the logits multiply by the embedding).
        self.output_layer = (
            None
            if config.tie_embeddings
            else LinearHead(config.hidden_size, config.vocab_size, config.init_std)
        )

    def embed_tokens(self, input_ids: torch.Tensor) -> torch.Tensor:
        """[B, S] token ids -> [B, S, C]."""
        return self.embedding.word_embeddings(input_ids)

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        segment_ids: torch.Tensor | None = None,
        kv_cache: KVCache | None = None,
        *,
        with_logits: bool = True,
        head_hidden: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
    ) -> LMOutput | CrossEntropyTotals:
        """Exactly one of input_ids [B, S] / inputs_embeds [B, S, C]. position_ids [B, S] default to 0..S-1
        (restarting per sample when segment_ids are given, continuing after the cache when one is passed).
        segment_ids [B, S]: packed samples attend only within their own contiguous run (0 = padding).
        with_logits=False skips the LM head (logits None), for a loss computed by the head mode.

        Head mode, `head_hidden` [B, S, C] (hidden_states of a with_logits=False forward) and `labels` [B, S]
        (-100 = no loss): the LM head's CrossEntropyTotals by the fused linear CE, no logits. It runs as this
        module's forward so that ZeRO-3 gathers the head weight (tied: the embedding, which training registers as
        an external parameter of the LLM)."""
        if labels is not None:
            return self._head_loss(head_hidden, labels)
        hidden = self._input_hidden(input_ids, inputs_embeds)
        batch, seq_len = hidden.shape[:2]
        past_len = 0 if kv_cache is None else kv_cache.length
        if segment_ids is not None:
            _check_shape("segment_ids", segment_ids, (batch, seq_len))
            if kv_cache is not None:
                raise ValueError("segment_ids (packed rows) cannot be combined with a kv_cache")
        if position_ids is None:
            if segment_ids is not None:
                position_ids = positions_from_segments(segment_ids)
            else:
                position_ids = torch.arange(past_len, past_len + seq_len, device=hidden.device).expand(
                    batch, -1
                )
        _check_shape("position_ids", position_ids, (batch, seq_len))

        cos, sin = rotary_cos_sin(position_ids, self.config.head_dim, self.config.rope_theta)
        attention_mask = AttentionMask.build(
            self.config.attention_backend, batch, seq_len, past_len, segment_ids, hidden.device, hidden.dtype
        )
        use_checkpointing = self.config.activation_checkpointing and self.training and torch.is_grad_enabled()
        for layer in self.decoder.layers:
            if use_checkpointing and kv_cache is None:
                hidden = checkpoint(layer, hidden, cos, sin, attention_mask, use_reentrant=False)
            else:
                hidden = layer(hidden, cos, sin, attention_mask, kv_cache)
        hidden = self.decoder.final_layernorm(hidden)
        logits = self._logits(hidden) if with_logits else None
        return LMOutput(logits=logits, hidden_states=hidden, kv_cache=kv_cache)

    def _input_hidden(
        self, input_ids: torch.Tensor | None, inputs_embeds: torch.Tensor | None
    ) -> torch.Tensor:
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("DecoderLM.forward needs exactly one of input_ids or inputs_embeds")
        if inputs_embeds is None:
            if input_ids.dim() != 2:
                raise ValueError(f"input_ids must be [batch, seq], got shape {tuple(input_ids.shape)}")
            return self.embed_tokens(input_ids)
        if inputs_embeds.dim() != 3 or inputs_embeds.shape[-1] != self.config.hidden_size:
            raise ValueError(
                f"inputs_embeds must be [batch, seq, {self.config.hidden_size}], got {tuple(inputs_embeds.shape)}"
            )
        return inputs_embeds

    def _logits(self, hidden: torch.Tensor) -> torch.Tensor:
        if self.output_layer is None:
            return F.linear(hidden, self.embedding.word_embeddings.weight)
        return self.output_layer(hidden)

    def _head_loss(self, hidden: torch.Tensor | None, labels: torch.Tensor) -> CrossEntropyTotals:
        if hidden is None or hidden.shape[:-1] != labels.shape:
            raise ValueError(
                f"the LM head mode needs head_hidden [B, S, C] matching labels {tuple(labels.shape)}, got "
                f"{None if hidden is None else tuple(hidden.shape)}"
            )
        if self.output_layer is not None:
            return self.output_layer(hidden, labels)
        flat = hidden.reshape(-1, hidden.shape[-1])
        return linear_cross_entropy(flat, self.embedding.word_embeddings.weight, labels.reshape(-1))

    @torch.no_grad()
    def resize_token_embeddings(self, new_vocab_size: int) -> None:
        """Grow the vocabulary (e.g. for added special tokens); new embedding rows (and head rows when untied)
        are the mean of the old rows, so new tokens start at the average token. Shrinking is refused."""
        old = self.config.vocab_size
        if new_vocab_size < old:
            raise ValueError(f"resize_token_embeddings: new_vocab_size {new_vocab_size} < current {old}")
        if new_vocab_size == old:
            return
        embedding = self.embedding.word_embeddings
        embedding.weight = nn.Parameter(_grow_rows(embedding.weight, new_vocab_size))
        embedding.num_embeddings = new_vocab_size
        if self.output_layer is not None:
            self.output_layer.weight = nn.Parameter(_grow_rows(self.output_layer.weight, new_vocab_size))
            self.output_layer.out_features = new_vocab_size
        self.config.vocab_size = new_vocab_size

    def load_checked_state_dict(
        self, state_dict: dict[str, torch.Tensor], source: str = "state dict", assign: bool = False
    ) -> None:
        """Load a complete state dict; missing, unexpected or misshapen tensors raise ValueError naming `source`
        and the tensor. assign=True replaces the parameters by the given tensors instead of copying into them."""
        expected = self.state_dict()
        missing = sorted(set(expected) - set(state_dict))
        unexpected = sorted(set(state_dict) - set(expected))
        if missing or unexpected:
            raise ValueError(f"{source}: missing tensors {missing}, unexpected tensors {unexpected}")
        for name, tensor in state_dict.items():
            if tuple(tensor.shape) != tuple(expected[name].shape):
                raise ValueError(
                    f"{source}: tensor {name} has shape {tuple(tensor.shape)}, expected {tuple(expected[name].shape)}"
                )
        self.load_state_dict(state_dict, strict=False, assign=assign)

    def save_pretrained(self, out_dir: str | Path) -> None:
        """Write llm_config.json + model.safetensors."""
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        self.config.to_json(out_dir / CONFIG_FILE)
        save_file(
            {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()},
            str(out_dir / WEIGHTS_FILE),
        )

    @classmethod
    def from_pretrained(cls, model_dir: str | Path, **config_overrides) -> DecoderLM:
        """Read our format; `config_overrides` set run-time options (activation_checkpointing,
        attention_backend), never shapes."""
        shape_fields = sorted(set(config_overrides) - RUNTIME_OPTIONS)
        if shape_fields:
            raise ValueError(
                f"from_pretrained can override only {sorted(RUNTIME_OPTIONS)}, not {shape_fields}"
            )
        model_dir = Path(model_dir)
        config = LLMConfig.from_json(model_dir / CONFIG_FILE, **config_overrides)
        weights = model_dir / WEIGHTS_FILE
        if not weights.is_file():
            raise FileNotFoundError(f"LLM weights not found: {weights}")
        return cls.from_state_dict(config, load_file(str(weights)), source=str(weights))

    @classmethod
    def from_state_dict(
        cls, config: LLMConfig, state_dict: dict[str, torch.Tensor], source: str = "state dict"
    ) -> DecoderLM:
        """Build a model holding `state_dict`: built on the meta device, it takes the tensors as they are (no
        random init, the dtype of the tensors)."""
        with torch.device("meta"):
            model = cls(config)
        model.load_checked_state_dict(state_dict, source=source, assign=True)
        return model


def _grow_rows(weight: torch.Tensor, rows: int) -> torch.Tensor:
    mean = weight.float().mean(dim=0, keepdim=True).to(weight.dtype)
    return torch.cat([weight, mean.expand(rows - weight.shape[0], -1)], dim=0)


def _check_shape(name: str, tensor: torch.Tensor, shape: tuple[int, ...]) -> None:
    if tuple(tensor.shape) != shape:
        raise ValueError(f"{name} must have shape {shape} (batch, seq), got {tuple(tensor.shape)}")
