"""Projector: codebook embedding (D) -> LLM hidden size (C), an MLP with GELU ([ETT] §3.2, LLaVA-style)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class ProjectorConfig:
    """depth 2 is Linear(D -> C), GELU, Linear(C -> C); depth 1 is a single Linear(D -> C)."""

    depth: int = 2


class Projector(nn.Module):
    def __init__(self, config: ProjectorConfig, code_dim: int, hidden_size: int) -> None:
        super().__init__()
        if config.depth < 1:
            raise ValueError(f"projector depth must be >= 1, got {config.depth}")
        layers: list[nn.Module] = [nn.Linear(code_dim, hidden_size)]
        for _ in range(config.depth - 1):
            layers += [nn.GELU(), nn.Linear(hidden_size, hidden_size)]
        self.mlp = nn.Sequential(*layers)

    def forward(self, codes: torch.Tensor) -> torch.Tensor:
        """codes [..., D] -> [..., C]."""
        return self.mlp(codes)
