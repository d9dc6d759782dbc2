"""Reconstruction and codebook metrics. Images are [B, C, H, W] in [-1, 1] (data range 2) unless told otherwise.

- PSNR = 10 log10(range^2 / MSE), per image, averaged over the batch.
- SSIM (Wang et al. 2004) with an 11x11 Gaussian window (sigma 1.5), K1 = 0.01, K2 = 0.03, population
  (co)variances, 'valid' windows only, averaged over channels, pixels and images.
- LPIPS: `modeling.tokenizer.perceptual.LPIPS` when weights exist.
- Codebook usage: fraction of the K codes used and the code perplexity.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from modeling.tokenizer.quantizers import usage_stats


def _check_pair(x: torch.Tensor, y: torch.Tensor) -> None:
    if x.shape != y.shape or x.dim() != 4:
        raise ValueError(
            f"expected two [B, C, H, W] tensors of the same shape, got {list(x.shape)} and {list(y.shape)}"
        )


@torch.no_grad()
def psnr(x: torch.Tensor, y: torch.Tensor, data_range: float = 2.0) -> torch.Tensor:
    _check_pair(x, y)
    mse = (x.float() - y.float()).pow(2).flatten(1).mean(dim=1).clamp_min(1e-12)
    return (10.0 * torch.log10(data_range**2 / mse)).mean()


def _gaussian_window(size: int, sigma: float) -> torch.Tensor:
    coords = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-(coords**2) / (2 * sigma**2))
    g = g / g.sum()
    return torch.outer(g, g)


@torch.no_grad()
def ssim(
    x: torch.Tensor, y: torch.Tensor, data_range: float = 2.0, window_size: int = 11, sigma: float = 1.5
) -> torch.Tensor:
    _check_pair(x, y)
    if min(x.shape[-2:]) < window_size:
        raise ValueError(f"SSIM needs H, W >= window_size={window_size}, got images of shape {list(x.shape)}")
    c = x.shape[1]
    window = _gaussian_window(window_size, sigma).to(torch.float64)[None, None].expand(c, 1, -1, -1)
    x, y = x.double(), y.double()

    def blur(t: torch.Tensor) -> torch.Tensor:
        return F.conv2d(t, window, groups=c)

    mu_x, mu_y = blur(x), blur(y)
    var_x = blur(x * x) - mu_x**2
    var_y = blur(y * y) - mu_y**2
    cov = blur(x * y) - mu_x * mu_y
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    ssim_map = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2))
    return ssim_map.mean().float()


@torch.no_grad()
def codebook_usage(indices: torch.Tensor, codebook_size: int) -> dict[str, float]:
    """indices (any shape) -> {"usage": fraction of codes used, "perplexity": exp(entropy of the code histogram)}."""
    stats = usage_stats(indices.long(), codebook_size)
    return {name: value.item() for name, value in stats.items()}
