"""Layers whose weights are initialised inside their own construction (`reset_parameters`).

DeepSpeed's `zero.Init` partitions every parameter as soon as its module is built, so a later `nn.init.*_` on the
parameter is a silent no-op under ZeRO-3. Initialising inside construction gives the same weights with and without
`zero.Init`.
"""

from __future__ import annotations

from torch import nn


class NormalInitLinear(nn.Linear):
    """nn.Linear initialised N(0, init_std), bias 0, inside `reset_parameters`, i.e. during construction, so the
    init also holds under DeepSpeed's zero.Init (which partitions parameters as each module is built)."""

    def __init__(self, in_features: int, out_features: int, bias: bool, init_std: float) -> None:
        self.init_std = init_std
        super().__init__(in_features, out_features, bias=bias)

    def reset_parameters(self) -> None:
        # Built on meta to take weights by assignment: nothing to initialise (and normal_ on meta imports
        # torch._dynamo, ~1 s per process).
        if self.weight.is_meta:
            return
        nn.init.normal_(self.weight, std=self.init_std)
        if self.bias is not None:
            nn.init.zeros_(self.bias)


class NormalInitEmbedding(nn.Embedding):
    """nn.Embedding initialised N(0, init_std) during construction (see NormalInitLinear)."""

    def __init__(self, num_embeddings: int, embedding_dim: int, init_std: float) -> None:
        self.init_std = init_std
        super().__init__(num_embeddings, embedding_dim)

    def reset_parameters(self) -> None:
        if self.weight.is_meta:
            return
        nn.init.normal_(self.weight, std=self.init_std)
