"""VQGAN convolutional encoder and decoder (taming-transformers layout, as used by IBQ).

Encoder: conv_in, then per level `num_res_blocks` ResNet blocks (+ attention where the level's nominal size is in
`attn_resolutions`) and a stride-2 downsample (all levels but the last); mid block ResBlock-Attn-ResBlock;
GroupNorm, swish, conv_out to `z_channels`. The decoder mirrors it with `num_res_blocks + 1` blocks per level and
nearest-neighbour upsampling.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import TokenizerConfig


def _norm(channels: int, groups: int) -> nn.GroupNorm:
    return nn.GroupNorm(groups, channels, eps=1e-6, affine=True)


class ResnetBlock(nn.Module):
    """x + conv(swish(norm(conv(swish(norm(x)))))), with a 1x1 shortcut when the channel count changes."""

    def __init__(self, in_channels: int, out_channels: int, groups: int) -> None:
        super().__init__()
        self.norm1 = _norm(in_channels, groups)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = _norm(out_channels, groups)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.nin_shortcut = (
            nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else nn.Identity()
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return self.nin_shortcut(x) + h


class AttnBlock(nn.Module):
    """Single-head spatial self-attention over the h*w positions, residual."""

    def __init__(self, channels: int, groups: int) -> None:
        super().__init__()
        self.norm = _norm(channels, groups)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(b, 3, c, h * w).transpose(-1, -2).unbind(1)
        out = F.scaled_dot_product_attention(q.unsqueeze(1), k.unsqueeze(1), v.unsqueeze(1)).squeeze(1)
        return x + self.proj_out(out.transpose(-1, -2).reshape(b, c, h, w))


class Downsample(nn.Module):
    """Stride-2 3x3 conv with taming's asymmetric (0, 1, 0, 1) padding: [B, C, H, W] -> [B, C, H/2, W/2]."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    """Nearest-neighbour x2 then 3x3 conv: [B, C, H, W] -> [B, C, 2H, 2W]."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Level(nn.Module):
    """One resolution level: ResNet blocks (each optionally followed by attention), then an optional resample."""

    def __init__(self, channels: list[int], attention: bool, resample: nn.Module | None, groups: int) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(ResnetBlock(i, o, groups) for i, o in zip(channels[:-1], channels[1:]))
        self.attns = nn.ModuleList(AttnBlock(o, groups) for o in channels[1:]) if attention else None
        self.resample = resample if resample is not None else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, block in enumerate(self.blocks):
            x = block(x)
            if self.attns is not None:
                x = self.attns[i](x)
        return self.resample(x)


class MidBlock(nn.Module):
    def __init__(self, channels: int, groups: int) -> None:
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels, groups)
        self.attn_1 = AttnBlock(channels, groups)
        self.block_2 = ResnetBlock(channels, channels, groups)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block_2(self.attn_1(self.block_1(x)))


class Encoder(nn.Module):
    """images [B, in_channels, H, W] -> features [B, z_channels, H/f, W/f] with f = config.downsample_factor."""

    def __init__(self, config: TokenizerConfig) -> None:
        super().__init__()
        ch, mult, groups = config.base_channels, config.channel_mult, config.norm_groups
        self.conv_in = nn.Conv2d(config.in_channels, ch, 3, padding=1)
        levels, res, block_in = [], config.resolution, ch
        for i, m in enumerate(mult):
            block_out = ch * m
            last = i == len(mult) - 1
            widths = [block_in] + [block_out] * config.num_res_blocks
            levels.append(
                Level(widths, res in config.attn_resolutions, None if last else Downsample(block_out), groups)
            )
            block_in, res = block_out, res if last else res // 2
        self.levels = nn.ModuleList(levels)
        self.mid = MidBlock(block_in, groups)
        self.norm_out = _norm(block_in, groups)
        self.conv_out = nn.Conv2d(block_in, config.z_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv_in(x)
        for level in self.levels:
            x = level(x)
        x = self.mid(x)
        return self.conv_out(F.silu(self.norm_out(x)))


class Decoder(nn.Module):
    """features [B, z_channels, h, w] -> images [B, in_channels, h*f, w*f]."""

    def __init__(self, config: TokenizerConfig) -> None:
        super().__init__()
        ch, mult, groups = config.base_channels, config.channel_mult, config.norm_groups
        block_in = ch * mult[-1]
        res = config.resolution // config.downsample_factor
        self.conv_in = nn.Conv2d(config.z_channels, block_in, 3, padding=1)
        self.mid = MidBlock(block_in, groups)
        levels = []
        for i in reversed(range(len(mult))):
            block_out = ch * mult[i]
            widths = [block_in] + [block_out] * (config.num_res_blocks + 1)
            levels.append(
                Level(widths, res in config.attn_resolutions, Upsample(block_out) if i else None, groups)
            )
            block_in, res = block_out, res * 2 if i else res
        self.levels = nn.ModuleList(levels)
        self.norm_out = _norm(block_in, groups)
        self.conv_out = nn.Conv2d(block_in, config.in_channels, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        x = self.mid(self.conv_in(z))
        for level in self.levels:
            x = level(x)
        return self.conv_out(F.silu(self.norm_out(x)))
