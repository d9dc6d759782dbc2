"""Linear and embedding layers of the decoder: plain torch at tp = 1, megatron-core tensor-parallel at tp > 1.

Supported with `tensor_parallel_size` = tp > 1 (megatron-core 0.16.1):
- Megatron tensor parallelism (Shoeybi et al. 2019): `linear_qkv` and `linear_fc1` are ColumnParallelLinear
  (each rank holds num_kv_heads/tp query groups and intermediate_size/tp gate and up rows), `linear_proj` and
  `linear_fc2` are RowParallelLinear (all-reduce of the output), the embedding is VocabParallelEmbedding
  (vocab_size/tp rows per rank) and the LM head a ColumnParallelLinear over the vocabulary whose logits are
  all-gathered, so every rank returns full [B, S, V] logits. A tied head uses the local embedding shard.
- Norms are replicated. Forward and backward, fp32 or bf16, CPU (gloo, with the shim of
  `modeling/llm/megatron_compat.py`) and CUDA (nccl).
- Weights move between our full (tp = 1) layout and a rank's shard with `shard_state_dict` /
  `gather_state_dict`, so `DecoderLM.from_pretrained` / `save_pretrained` work at any tp.

Not supported: sequence parallelism, pipeline parallelism, context parallelism, vocab-parallel cross entropy
(logits are gathered), Megatron's DDP/distributed optimizer, flash-attn under tp (it works per rank but is
untested), and tp combined with DeepSpeed ZeRO (ZeRO would shard the already tensor-parallel parameters; the
training stack uses ZeRO-3 with tp = 1). The tensor-parallel group must be set up first with
`modeling.llm.megatron_compat.initialize_tensor_parallel(tp)`.
"""

from __future__ import annotations

import functools
import math

import torch
import torch.distributed as dist
from torch import nn

from modeling.layers import NormalInitEmbedding, NormalInitLinear
from modeling.llm.config import LLMConfig

# Name suffix -> (partition dim, stride) of tensors that are split across tensor-parallel ranks; every other
# tensor is replicated. Stride 2: the tensor is two stacked halves ([gate; up]) and each rank takes its chunk
# of both halves, which is also how megatron-core initialises `linear_fc1` (stride=2).
TP_PARTITIONS: dict[str, tuple[int, int]] = {
    "embedding.word_embeddings.weight": (0, 1),
    "self_attention.linear_qkv.weight": (0, 1),
    "self_attention.linear_qkv.bias": (0, 1),
    "self_attention.linear_proj.weight": (1, 1),
    "mlp.linear_fc1.weight": (0, 2),
    "mlp.linear_fc2.weight": (1, 1),
    "output_layer.weight": (0, 1),
}


def partition_of(name: str) -> tuple[int, int] | None:
    for suffix, partition in TP_PARTITIONS.items():
        if name.endswith(suffix):
            return partition
    return None


def shard_tensor(tensor: torch.Tensor, dim: int, stride: int, rank: int, tp: int) -> torch.Tensor:
    """The rank's shard of a full tensor: split into stride*tp chunks along dim, take chunks rank, rank+tp, ..."""
    if tensor.shape[dim] % (stride * tp):
        raise ValueError(
            f"cannot split dim {dim} of shape {tuple(tensor.shape)} into {stride * tp} equal chunks"
        )
    return torch.cat(tensor.chunk(stride * tp, dim=dim)[rank::tp], dim=dim).contiguous()


def shard_state_dict(full: dict[str, torch.Tensor], rank: int, tp: int) -> dict[str, torch.Tensor]:
    """Our full (tp = 1) state dict -> rank's tensor-parallel state dict."""
    local = {}
    for name, tensor in full.items():
        partition = partition_of(name)
        local[name] = tensor if partition is None else shard_tensor(tensor, *partition, rank=rank, tp=tp)
    return local


def gather_state_dict(local: dict[str, torch.Tensor], tp: int) -> dict[str, torch.Tensor]:
    """All-gather a rank's tensor-parallel tensors (parameters or their gradients, by name) into the full
    (tp = 1) layout, on every rank. Inverse of `shard_state_dict`."""
    group = tp_group()
    full = {}
    for name, tensor in local.items():
        if name.endswith("_extra_state"):
            continue
        partition = partition_of(name)
        if partition is None:
            full[name] = tensor
            continue
        dim, stride = partition
        shards = [torch.empty_like(tensor) for _ in range(tp)]
        dist.all_gather(shards, tensor.contiguous(), group=group)
        pieces = [shard.chunk(stride, dim=dim) for shard in shards]
        full[name] = torch.cat([pieces[r][s] for s in range(stride) for r in range(tp)], dim=dim)
    return full


def tp_group():
    from megatron.core import parallel_state

    return parallel_state.get_tensor_model_parallel_group()


def _megatron_config(tp: int, dtype: torch.dtype):
    from megatron.core import parallel_state
    from megatron.core.model_parallel_config import ModelParallelConfig

    if not parallel_state.model_parallel_is_initialized():
        raise ValueError(
            f"tensor_parallel_size={tp} needs megatron-core's parallel state: call "
            "modeling.llm.megatron_compat.initialize_tensor_parallel(tp) after torch.distributed.init_process_group"
        )
    world = parallel_state.get_tensor_model_parallel_world_size()
    if world != tp:
        raise ValueError(
            f"LLMConfig.tensor_parallel_size={tp} but the tensor-parallel group has {world} ranks"
        )
    return ModelParallelConfig(
        tensor_model_parallel_size=tp,
        use_cpu_initialization=True,
        params_dtype=dtype,
        sequence_parallel=False,
        gradient_accumulation_fusion=False,
    )


def _normal_init(std: float):
    return functools.partial(nn.init.normal_, mean=0.0, std=std)


@functools.cache
def _megatron_layers() -> tuple[type, type]:
    """megatron-core's parallel linears, returning only the output tensor (megatron returns (output, bias))."""
    from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear

    class ColumnLinear(ColumnParallelLinear):
        def forward(self, x: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
            return super().forward(x, weight=weight)[0]

    class RowLinear(RowParallelLinear):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return super().forward(x)[0]

    return ColumnLinear, RowLinear


def build_column_linear(
    config: LLMConfig, in_features: int, out_features: int, bias: bool, stride: int = 1
) -> nn.Module:
    """y = x W^T (+ b) with W [out, in], init N(0, init_std); at tp > 1 each rank computes out/tp outputs."""
    if config.tensor_parallel_size == 1:
        return NormalInitLinear(in_features, out_features, bias, config.init_std)
    column_linear, _ = _megatron_layers()
    return column_linear(
        in_features,
        out_features,
        config=_megatron_config(config.tensor_parallel_size, torch.get_default_dtype()),
        init_method=_normal_init(config.init_std),
        bias=bias,
        stride=stride,
    )


def build_row_linear(config: LLMConfig, in_features: int, out_features: int) -> nn.Module:
    """Output projections (attention out, MLP down), init std scaled by 1/sqrt(2 * num_layers) (Megatron's
    `output_layer_init_method`); at tp > 1 each rank holds in/tp inputs and the outputs are all-reduced."""
    std = config.init_std / math.sqrt(2.0 * config.num_layers)
    if config.tensor_parallel_size == 1:
        return NormalInitLinear(in_features, out_features, False, std)
    _, row_linear = _megatron_layers()
    return row_linear(
        in_features,
        out_features,
        config=_megatron_config(config.tensor_parallel_size, torch.get_default_dtype()),
        init_method=_normal_init(std),
        bias=False,
        input_is_parallel=True,
        skip_bias_add=False,
    )


def build_embedding(config: LLMConfig) -> nn.Module:
    """Token embedding [V, C]; VocabParallelEmbedding (V/tp rows per rank, all-reduced) at tp > 1."""
    if config.tensor_parallel_size == 1:
        return NormalInitEmbedding(config.vocab_size, config.hidden_size, config.init_std)
    from megatron.core.tensor_parallel import VocabParallelEmbedding

    return VocabParallelEmbedding(
        config.vocab_size,
        config.hidden_size,
        init_method=_normal_init(config.init_std),
        config=_megatron_config(config.tensor_parallel_size, torch.get_default_dtype()),
    )


def build_output_layer(config: LLMConfig) -> nn.Module | None:
    """LM head [V, C]. tp = 1: nn.Linear, or None when tied (the model multiplies by the embedding). tp > 1: a
    ColumnParallelLinear over the vocabulary with all-gathered logits; tied, it holds no weight and is called
    with the local embedding shard."""
    if config.tensor_parallel_size == 1:
        if config.tie_embeddings:
            return None
        return NormalInitLinear(config.hidden_size, config.vocab_size, False, config.init_std)
    column_linear, _ = _megatron_layers()
    return column_linear(
        config.hidden_size,
        config.vocab_size,
        config=_megatron_config(config.tensor_parallel_size, torch.get_default_dtype()),
        init_method=_normal_init(config.init_std),
        bias=False,
        gather_output=True,
        skip_weight_param_allocation=config.tie_embeddings,
    )
