"""Quantizers: IBQ (index backpropagation, docs/method.md) and classic VQ (nearest code in L2).

Both take z [B, D, h, w] and return a `QuantizerOutput` whose `quantized` has the forward value of the selected
codes exactly, straight-through gradients, the unweighted loss terms and usage statistics. The codebook lookups
go through `modeling.kernels` (Triton on CUDA, chunked torch on CPU), so the N x K logits are never materialised.
"""

from __future__ import annotations

import abc
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from .config import TokenizerConfig

try:
    from modeling.kernels import codebook_argmax, codebook_entropy_loss, ibq_straight_through
except ModuleNotFoundError:  # copied into a Hugging Face export (training/hf_model), next to kernels.py
    from .kernels import codebook_argmax, codebook_entropy_loss, ibq_straight_through


class QuantizerOutput(NamedTuple):
    """A NamedTuple so that DeepSpeed ZeRO-3 sees its tensors and hooks the backward pass."""

    quantized: torch.Tensor  # [B, D, h, w], forward value = codebook[indices]
    indices: torch.Tensor  # [B, h, w] int64
    losses: dict[str, torch.Tensor]  # "quant", "entropy": unweighted scalars; {} without with_losses
    stats: dict[str, torch.Tensor]  # "perplexity", "usage": detached scalars


def usage_stats(indices: torch.Tensor, codebook_size: int) -> dict[str, torch.Tensor]:
    """perplexity = exp(H(code histogram)); usage = fraction of the K codes chosen at least once in `indices`.

    Device tensors, computed without a host sync: the histogram is a fixed-size [K] index_add_ (torch.bincount
    reads max(indices) back to the host on CUDA to size its output). Same integer counts, so the same values.
    """
    flat = indices.reshape(-1)
    counts = torch.zeros(codebook_size, dtype=torch.long, device=flat.device)
    counts = counts.index_add_(0, flat, torch.ones_like(flat)).float()
    probs = counts / counts.sum().clamp_min(1.0)
    entropy = -(probs * torch.log(probs.clamp_min(1e-12))).sum()
    return {"perplexity": entropy.exp(), "usage": (counts > 0).float().mean()}


class Codebook(nn.Embedding):
    """The [K, D] codebook: N(0, 1) (IBQ) or U(-b, b) (VQ) init inside `reset_parameters`, i.e. during its own
    construction, so the init also holds under DeepSpeed's zero.Init (which partitions each module's parameters as
    soon as the module is built; a later `nn.init.*_` on them is a silent no-op)."""

    def __init__(self, num_codes: int, code_dim: int, uniform_bound: float | None = None) -> None:
        self.uniform_bound = uniform_bound
        super().__init__(num_codes, code_dim)

    def reset_parameters(self) -> None:
        if self.weight.is_meta:  # built on meta to take weights by assignment: nothing to initialise
            return
        if self.uniform_bound is None:
            nn.init.normal_(self.weight)
        else:
            nn.init.uniform_(self.weight, -self.uniform_bound, self.uniform_bound)


class Quantizer(nn.Module, abc.ABC):
    """Shared parts: the codebook (an nn.Embedding leaf, so ZeRO-3 partitions it like any weight) and flattening.
    The forward never synchronises with the host; its usage statistics are device tensors (`usage_stats`).

    The codebook is only ever read by calling the embedding module (`codes()`, `embed()`), never through
    `.weight`, so that ZeRO-3's module hooks gather the partitioned parameter around each read."""

    def __init__(self, config: TokenizerConfig, uniform_bound: float | None = None) -> None:
        super().__init__()
        self.codebook_size = config.codebook_size
        self.code_dim = config.code_dim
        self.beta = config.beta
        self.entropy_temperature = config.entropy_temperature
        self.use_entropy = config.loss.entropy_weight > 0
        self.embedding = Codebook(config.codebook_size, config.code_dim, uniform_bound)
        self.register_buffer("code_ids", torch.arange(config.codebook_size), persistent=False)

    def codes(self) -> torch.Tensor:
        """The codebook as the quantizer uses it, [K, D] (differentiable)."""
        return self.embedding(self.code_ids)

    def embed(self, indices: torch.Tensor) -> torch.Tensor:
        """Plain codebook lookup: indices [...] -> [..., D]."""
        return self.embedding(indices)

    def forward(self, z: torch.Tensor, with_losses: bool = True) -> QuantizerOutput:
        """z [B, D, h, w] -> QuantizerOutput. `with_losses=False` skips L_quant and L_entropy (losses {}): the codes
        and their gradients are the same, for callers that discard the losses (frozen tokenizers, encode)."""
        b, d, h, w = z.shape
        if d != self.code_dim:
            raise ValueError(
                f"quantizer input has {d} channels, expected code_dim={self.code_dim} (z [B, D, h, w])"
            )
        z_flat = z.permute(0, 2, 3, 1).reshape(-1, d)
        z_q, indices, losses = self.quantize(z_flat, with_losses)
        return QuantizerOutput(
            quantized=z_q.reshape(b, h, w, d).permute(0, 3, 1, 2),
            indices=indices.reshape(b, h, w),
            losses=losses,
            stats=usage_stats(indices.detach(), self.codebook_size),
        )

    @abc.abstractmethod
    def quantize(
        self, z: torch.Tensor, with_losses: bool
    ) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        """z [N, D] -> (straight-through z_q [N, D], indices [N], unweighted losses, {} without with_losses)."""


class IBQuantizer(Quantizer):
    """Index backpropagation quantization: k* = argmax_k <z, c_k>, z_q = (H - sg(S) + S) C with S = softmax(z C^T),
    so every code and the encoder get gradient. Losses (means over elements, beta on the codebook term):
    L_quant = ||z_q - z||^2 + ||sg(z_q2) - z||^2 + beta ||z_q2 - sg(z)||^2 with z_q2 = H C;
    L_entropy = mean_n H(softmax(z C^T / T)_n) - H(mean_n softmax(z C^T / T)). Codebook init N(0, 1) as in IBQ."""

    def __init__(self, config: TokenizerConfig) -> None:
        super().__init__(config)

    def quantize(
        self, z: torch.Tensor, with_losses: bool
    ) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        codebook = self.codes()
        z_q, indices = ibq_straight_through(z, codebook)
        if not with_losses:
            return z_q, indices, {}
        z_q2 = F.embedding(indices, codebook)
        quant = F.mse_loss(z_q, z) + F.mse_loss(z, z_q2.detach()) + self.beta * F.mse_loss(z_q2, z.detach())
        if self.use_entropy:
            entropy = codebook_entropy_loss(z, codebook, self.entropy_temperature)
        else:
            entropy = z.new_zeros(())
        return z_q, indices, {"quant": quant, "entropy": entropy}


class VectorQuantizer(Quantizer):
    """Classic VQ-VAE: k* = argmin_k ||z - c_k||^2 = argmax_k (<z, c_k> - ||c_k||^2 / 2).
    z_q = sg(c_k*) + (z - sg(z)): forward value exactly c_k*, gradient straight through to z.
    L_quant = ||c_k* - sg(z)||^2 + beta ||z - sg(c_k*)||^2 (codebook + commitment): only the selected rows get
    codebook gradient. With `vq_l2_normalize`, z and the codes are unit-normalised before the lookup. With
    `vq_output_l2_normalize` only the selected code is unit-normalised (lookup on raw z and codes, as transformers'
    JanusVQVAE: raw argmin in its forward, normalised entries in `get_codebook_entry`).
    L_entropy uses the logits -||z - c_k||^2 / 2 at temperature T, computed by the same kernel as z.c_k + b_k with
    the per-code bias b_k = -||c_k||^2 / 2 (differentiable; the -||z||^2 / 2 term is constant per row), so the
    kernel sees the code dim D itself (an appended [c_k, b_k] column would make D = 257 at the paper's D = 256)."""

    def __init__(self, config: TokenizerConfig) -> None:
        super().__init__(config, uniform_bound=1.0 / config.codebook_size)
        self.l2_normalize = config.vq_l2_normalize
        self.output_l2_normalize = config.vq_output_l2_normalize

    def codes(self) -> torch.Tensor:
        codes = super().codes()
        return F.normalize(codes, dim=-1) if self.l2_normalize else codes

    def embed(self, indices: torch.Tensor) -> torch.Tensor:
        codes = super().embed(indices)
        return F.normalize(codes, dim=-1) if self.l2_normalize or self.output_l2_normalize else codes

    def quantize(
        self, z: torch.Tensor, with_losses: bool
    ) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        if self.l2_normalize:
            z = F.normalize(z, dim=-1)
        codebook = self.codes()
        half_sq_norm = 0.5 * codebook.float().pow(2).sum(-1)
        indices, _ = codebook_argmax(z.detach(), codebook.detach(), bias=-half_sq_norm.detach())
        selected = F.embedding(indices, codebook)
        if self.output_l2_normalize:
            selected = F.normalize(selected, dim=-1)
        z_q = selected.detach() + (z - z.detach())
        if not with_losses:
            return z_q, indices, {}
        quant = F.mse_loss(selected, z.detach()) + self.beta * F.mse_loss(z, selected.detach())
        if self.use_entropy:
            entropy = codebook_entropy_loss(z, codebook, self.entropy_temperature, bias=-half_sq_norm)
        else:
            entropy = z.new_zeros(())
        return z_q, indices, {"quant": quant, "entropy": entropy}


def build_quantizer(config: TokenizerConfig) -> Quantizer:
    if config.quantizer == "ibq":
        return IBQuantizer(config)
    if config.quantizer == "vq":
        return VectorQuantizer(config)
    raise ValueError(f"TokenizerConfig.quantizer must be 'ibq' or 'vq', got {config.quantizer!r}")
