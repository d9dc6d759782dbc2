"""VQTokenizer: encoder -> quant_conv -> quantizer -> post_quant_conv -> decoder (docs/method.md).

The ETT model calls `quantize_images` (encoder + quantizer; the straight-through codes go to the projector) and
`decode` separately; stage-0 training calls `forward`. Weights save as `model.safetensors` + `tokenizer_config.json`
(`save_pretrained` on a ZeRO-3-partitioned model needs the consolidated weights: use the export path).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import NamedTuple

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from .config import TokenizerConfig
from .encoder_decoder import Decoder, Encoder
from .quantizers import build_quantizer

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "tokenizer_config.json"


class TokenizerOutput(NamedTuple):
    """A NamedTuple so that DeepSpeed ZeRO-3 sees its tensors and hooks the backward pass."""

    reconstruction: torch.Tensor  # [B, 3, H, W]
    indices: torch.Tensor  # [B, h, w] int64
    quantized: torch.Tensor  # [B, D, h, w], straight-through codes
    quant_losses: dict[str, torch.Tensor]  # unweighted "quant", "entropy"
    stats: dict[str, torch.Tensor]  # "perplexity", "usage" (fraction of codes used in this batch)


class VQTokenizer(nn.Module):
    def __init__(self, config: TokenizerConfig) -> None:
        super().__init__()
        config.validate()
        self.config = config
        self.encoder = Encoder(config)
        self.quant_conv = nn.Conv2d(config.z_channels, config.code_dim, 1)
        self.quantizer = build_quantizer(config)
        self.post_quant_conv = nn.Conv2d(config.code_dim, config.z_channels, 1)
        self.decoder = Decoder(config)

    @property
    def codebook(self) -> torch.Tensor:
        """The [K, D] codebook parameter (the weight of an nn.Embedding leaf module)."""
        return self.quantizer.embedding.weight

    @property
    def downsample_factor(self) -> int:
        return self.config.downsample_factor

    def _check_images(self, images: torch.Tensor) -> None:
        f, c = self.downsample_factor, self.config.in_channels
        if images.dim() != 4 or images.shape[1] != c:
            raise ValueError(f"images have shape {list(images.shape)}, expected [B, {c}, H, W]")
        height, width = images.shape[-2:]
        if height % f or width % f:
            raise ValueError(
                f"images have shape {list(images.shape)}: H={height} and W={width} must be multiples of the "
                f"downsample factor {f}, e.g. [B, {c}, {max(f, height // f * f)}, {max(f, width // f * f)}]"
            )

    def _check_indices(self, indices: torch.Tensor) -> None:
        if indices.dim() != 3 or indices.dtype != torch.long:
            raise ValueError(
                f"indices have shape {list(indices.shape)} and dtype {indices.dtype}, expected [B, h, w] int64"
            )
        k = self.config.codebook_size
        if indices.numel() and (indices.min().item() < 0 or indices.max().item() >= k):
            raise ValueError(
                f"indices must lie in [0, {k}) (codebook_size), got [{indices.min().item()}, {indices.max().item()}]"
            )

    def quantize_images(
        self, images: torch.Tensor, with_losses: bool = True
    ) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """images [B, 3, H, W] in [-1, 1] -> (quantized [B, D, h, w], indices [B, h, w], quant_losses, stats);
        quant_losses is {} with `with_losses=False` (the quantizer skips L_quant and L_entropy)."""
        self._check_images(images)
        out = self.quantizer(self.quant_conv(self.encoder(images)), with_losses)
        return out.quantized, out.indices, out.losses, out.stats

    def decode(self, quantized: torch.Tensor) -> torch.Tensor:
        """quantized [B, D, h, w] -> images [B, 3, h*f, w*f]."""
        if quantized.dim() != 4 or quantized.shape[1] != self.config.code_dim:
            raise ValueError(
                f"quantized has shape {list(quantized.shape)}, expected [B, {self.config.code_dim}, h, w]"
            )
        return self.decoder(self.post_quant_conv(quantized))

    def forward(self, images: torch.Tensor) -> TokenizerOutput:
        quantized, indices, losses, stats = self.quantize_images(images)
        return TokenizerOutput(self.decode(quantized), indices, quantized, losses, stats)

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """images [B, 3, H, W] -> indices [B, H/f, W/f]."""
        return self.quantize_images(images, with_losses=False)[1]

    def embed(self, indices: torch.Tensor) -> torch.Tensor:
        """indices [B, h, w] -> codebook embeddings [B, h, w, D] (plain lookup, gradient to the selected rows)."""
        self._check_indices(indices)
        return self.quantizer.embed(indices)

    def decode_indices(self, indices: torch.Tensor) -> torch.Tensor:
        """indices [B, h, w] -> images [B, 3, h*f, w*f]."""
        return self.decode(self.embed(indices).permute(0, 3, 1, 2))

    @torch.no_grad()
    def reconstruct(self, images: torch.Tensor) -> torch.Tensor:
        return self.forward(images).reconstruction

    def save_pretrained(self, directory: str | Path) -> None:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        save_file(state, str(directory / WEIGHTS_NAME), metadata={"format": "pt"})
        (directory / CONFIG_NAME).write_text(json.dumps(self.config.to_dict(), indent=2) + "\n")

    @classmethod
    def from_pretrained(cls, directory: str | Path, map_location: str | torch.device = "cpu") -> VQTokenizer:
        directory = Path(directory)
        for name in (CONFIG_NAME, WEIGHTS_NAME):
            if not (directory / name).is_file():
                raise FileNotFoundError(
                    f"{directory / name} not found: a tokenizer directory needs {CONFIG_NAME} and {WEIGHTS_NAME}"
                )
        config = TokenizerConfig.from_dict(json.loads((directory / CONFIG_NAME).read_text()))
        model = cls(config)
        state = load_file(str(directory / WEIGHTS_NAME), device=str(map_location))
        missing, unexpected = model.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise ValueError(
                f"{directory / WEIGHTS_NAME} does not match {CONFIG_NAME}: missing keys {missing[:5]}, "
                f"unexpected keys {unexpected[:5]}"
            )
        return model
