"""PatchGAN discriminator (pix2pix `NLayerDiscriminator`, as in taming/IBQ).

images [B, 3, H, W] -> patch logits [B, 1, H', W']. Layers: conv4x4/2 + LeakyReLU(0.2), then `layers - 1` blocks
conv4x4/2 + norm + LeakyReLU with widths ndf * min(2^n, 8), one conv4x4/1 block, and a conv4x4/1 to one channel.
Norm: "group" (default; per-sample statistics, so the replicated discriminator behaves the same on every rank and
for real and fake batches passed separately), "batch" (pix2pix/IBQ original) or "none".
"""

from __future__ import annotations

import math

import torch
from torch import nn

from modeling.tokenizer.config import VQLossConfig


def _norm(kind: str, channels: int) -> nn.Module:
    if kind == "group":
        return nn.GroupNorm(math.gcd(32, channels), channels)
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    if kind == "none":
        return nn.Identity()
    raise ValueError(f"VQLossConfig.disc_norm must be 'group', 'batch' or 'none', got {kind!r}")


class PatchDiscriminator(nn.Module):
    def __init__(self, config: VQLossConfig, in_channels: int = 3) -> None:
        super().__init__()
        if config.disc_layers < 1 or config.disc_ndf < 1:
            raise ValueError(
                f"VQLossConfig.disc_layers and disc_ndf must be >= 1, got {config.disc_layers} and {config.disc_ndf}"
            )
        ndf, n_layers, norm = config.disc_ndf, config.disc_layers, config.disc_norm
        use_bias = norm == "none"
        layers: list[nn.Module] = [nn.Conv2d(in_channels, ndf, 4, stride=2, padding=1), nn.LeakyReLU(0.2)]
        width = ndf
        for n in range(1, n_layers + 1):
            out = ndf * min(2**n, 8)
            stride = 2 if n < n_layers else 1
            layers += [
                nn.Conv2d(width, out, 4, stride=stride, padding=1, bias=use_bias),
                _norm(norm, out),
                nn.LeakyReLU(0.2),
            ]
            width = out
        layers.append(nn.Conv2d(width, 1, 4, stride=1, padding=1))
        self.main = nn.Sequential(*layers)
        self.n_layers = n_layers
        self.min_size = 3 * 2**n_layers
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """pix2pix init: conv weights N(0, 0.02), norm scales N(1, 0.02), biases 0."""
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.normal_(module.weight, 0.0, 0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.GroupNorm | nn.BatchNorm2d):
                nn.init.normal_(module.weight, 1.0, 0.02)
                nn.init.zeros_(module.bias)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.dim() != 4 or min(images.shape[-2:]) < self.min_size:
            raise ValueError(
                f"discriminator input has shape {list(images.shape)}, expected [B, C, H, W] with H, W >= "
                f"{self.min_size} for disc_layers={self.n_layers}"
            )
        return self.main(images.to(self.main[0].weight.dtype))
