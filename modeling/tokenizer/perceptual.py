"""LPIPS perceptual distance on VGG16 features, in plain torch (torchvision is not required).

LPIPS(x, y) = sum_l mean_{h,w} w_l . (phi_l(x) / ||phi_l(x)|| - phi_l(y) / ||phi_l(y)||)^2, where phi_l are the
VGG16 activations relu1_2, relu2_2, relu3_3, relu4_3, relu5_3 (channel-normalised) and w_l >= 0 the learned
linear heads (Zhang et al. 2018). Inputs are in [-1, 1].

Weights come from ONE local file (safetensors, or a torch pickle read with weights_only=True) holding:
- VGG16 convolutions in torchvision's layout: `features.{0,2,5,7,10,12,14,17,19,21,24,26,28}.{weight,bias}`
  (taming's `net.slice{i}.{j}.*` layout is accepted too and mapped to `features.{j}.*`);
- LPIPS heads in the official layout: `lin{0..4}.model.1.weight` with shapes [1, C_l, 1, 1].
Merge torchvision's `vgg16-397923af.pth` (the `features.*` keys) and LPIPS's `vgg.pth` into such a file.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from torch import nn

# VGG16 "D" configuration: output channels per conv, "M" = 2x2 max-pool.
_VGG16 = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512)
# index in `features` after which each LPIPS tap (relu1_2 ... relu5_3) is read.
_TAPS = (3, 8, 15, 22, 29)
_TAP_CHANNELS = (64, 128, 256, 512, 512)


class VGG16Features(nn.Module):
    """torchvision's `vgg16().features` (same module indices, so the same state-dict keys) up to relu5_3."""

    def __init__(self) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        width = 3
        for item in _VGG16:
            if item == "M":
                layers.append(nn.MaxPool2d(2, 2))
            else:
                layers += [nn.Conv2d(width, item, 3, padding=1), nn.ReLU()]
                width = item
        self.features = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """x [B, 3, H, W] (ImageNet-normalised) -> the five tap activations."""
        taps = []
        for i, layer in enumerate(self.features):
            x = layer(x)
            if i in _TAPS:
                taps.append(x)
        return taps


class LinearHead(nn.Module):
    """LPIPS's per-layer 1x1 conv (no bias); `model.1` keeps the official key layout (model.0 is a dropout)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.model = nn.Sequential(nn.Identity(), nn.Conv2d(channels, 1, 1, bias=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


class LPIPS(nn.Module):
    """Frozen LPIPS-VGG: (x, y) [B, 3, H, W] in [-1, 1] -> per-image distance [B]. Gradient flows to the inputs."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer(
            "shift", torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1), persistent=False
        )
        self.register_buffer("scale", torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1), persistent=False)
        self.net = VGG16Features()
        self.lins = nn.ModuleList(LinearHead(c) for c in _TAP_CHANNELS)
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> LPIPS:
        """Always in eval mode: it is a fixed metric network."""
        return super().train(False)

    @classmethod
    def from_file(cls, path: str | Path, field: str = "perceptual_weights_path") -> LPIPS:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(
                f"{field}={path}: file not found. LPIPS needs local VGG16 + LPIPS-head weights "
                "(see modeling/tokenizer/perceptual.py for the key layout), or set perceptual_weight=0"
            )
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            raw = load_file(str(path))
        else:
            raw = torch.load(path, map_location="cpu", weights_only=True)
        model = cls()
        model.load_weights(raw, str(path))
        return model

    def load_weights(self, raw: dict[str, torch.Tensor], source: str) -> None:
        state = {}
        for key, value in raw.items():
            key = re.sub(r"^(?:net\.)?slice\d\.", "features.", key.removeprefix("module."))
            key = key.removeprefix("net.")
            if key.startswith("features."):
                state["net." + key] = value
            elif key.startswith("lin"):
                state["lins." + key.removeprefix("lin")] = value
        missing, _ = self.load_state_dict(state, strict=False)
        if missing:
            raise ValueError(
                f"{source} lacks LPIPS weights {missing[:6]}{' ...' if len(missing) > 6 else ''}"
            )

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Computed in the network's own dtype (fp32): bf16 images from a bf16 engine are cast, not promoted
        halfway by the fp32 shift/scale buffers."""
        dtype = self.shift.dtype
        x, y = x.to(dtype), y.to(dtype)
        feats_x = self.net((x - self.shift) / self.scale)
        feats_y = self.net((y - self.shift) / self.scale)
        total = x.new_zeros(x.shape[0])
        for lin, fx, fy in zip(self.lins, feats_x, feats_y):
            diff = (_unit(fx) - _unit(fy)).pow(2)
            total = total + lin(diff).mean(dim=(1, 2, 3))
        return total


def _unit(x: torch.Tensor, eps: float = 1e-10) -> torch.Tensor:
    """Normalise over channels, as LPIPS does: x / (||x||_2 + eps)."""
    return x / (x.pow(2).sum(dim=1, keepdim=True).sqrt() + eps)
