"""Exponential moving average of model weights (IBQ keeps one, decay 0.999).

    ema = ModelEMA(tokenizer, decay=0.999)
    ... optimizer.step(); ema.update(tokenizer)
    ema.copy_to(eval_tokenizer)

shadow <- decay * shadow + (1 - decay) * param (fp32 shadows of every parameter). Works on full (unpartitioned)
parameters: under ZeRO-3 gather the weights before updating, or keep EMA off.
"""

from __future__ import annotations

import torch
from torch import nn


class ModelEMA:
    def __init__(self, model: nn.Module, decay: float = 0.999) -> None:
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay must be in [0, 1), got {decay}")
        self.decay = decay
        self.num_updates = 0
        self.shadow = {name: p.detach().clone().float() for name, p in model.named_parameters()}

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        for name, p in model.named_parameters():
            if name not in self.shadow:
                raise ValueError(
                    f"EMA has no shadow for parameter {name!r}: the model changed after ModelEMA()"
                )
            self.shadow[name].lerp_(p.detach().float(), 1.0 - self.decay)
        self.num_updates += 1

    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> None:
        """Write the averaged weights into `model` (same architecture)."""
        for name, p in model.named_parameters():
            p.copy_(self.shadow[name].to(p.dtype))

    def state_dict(self) -> dict:
        return {"decay": self.decay, "num_updates": self.num_updates, "shadow": dict(self.shadow)}

    def load_state_dict(self, state: dict) -> None:
        missing = sorted(set(self.shadow) - set(state["shadow"]))
        if missing:
            raise ValueError(f"EMA state lacks parameters {missing[:5]}")
        self.shadow = {name: value.detach().clone().float() for name, value in state["shadow"].items()}
        self.decay, self.num_updates = state["decay"], state["num_updates"]
