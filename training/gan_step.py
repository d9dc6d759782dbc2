"""The two-optimizer GAN step of tokenizer training (IBQ order: discriminator first, then the tokenizer).

`DiscriminatorStep` updates the PatchGAN discriminator on real images and detached reconstructions. It is used by
stage 0 (tokenizer pretraining) and, when the stage config keeps the discriminator training, by ETT stage 2, where
the tokenizer's update is the DeepSpeed engine's. The discriminator is small and stays replicated outside ZeRO: when
torch.distributed is initialised its gradients are averaged over ranks before the step, so replicas stay equal.

`TokenizerTrainStep` is the whole stage-0 step with plain torch optimizers (one process, or a data-parallel loop
that averages the tokenizer gradients itself):

    step = TokenizerTrainStep(tokenizer, VQLoss(cfg), DiscriminatorStep(disc, vq_loss, d_opt), g_opt, ema)
    logs = step.step(images, global_step)
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from modeling.tokenizer import ModelEMA, VQLoss, VQTokenizer


def all_reduce_gradients(module: nn.Module) -> None:
    """Average `module`'s gradients over all ranks (no-op in a single process)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return
    grads = [p.grad for p in module.parameters() if p.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= dist.get_world_size()
    offset = 0
    for g in grads:
        g.copy_(flat[offset : offset + g.numel()].view_as(g))
        offset += g.numel()


class DiscriminatorStep:
    """One discriminator update: zero_grad, hinge + LeCAM loss, backward, all-reduce, optimizer step.

    Inactive before `loss.config.gan_start_step` or with gan_weight 0: no forward, no update, logs are zeros."""

    def __init__(self, discriminator: nn.Module, loss: VQLoss, optimizer: torch.optim.Optimizer) -> None:
        self.discriminator = discriminator
        self.loss = loss
        self.optimizer = optimizer

    def step(self, images: torch.Tensor, reconstruction: torch.Tensor, step: int) -> dict[str, float]:
        """images, reconstruction [B, 3, H, W] (the reconstruction is detached here) -> logged floats."""
        self.discriminator.train()
        self.optimizer.zero_grad(set_to_none=True)
        loss, logs = self.loss.discriminator_loss(images, reconstruction.detach(), self.discriminator, step)
        if self.loss.gan_active(step):
            loss.backward()
            all_reduce_gradients(self.discriminator)
            self.optimizer.step()
        return {f"disc/{name}": value.item() for name, value in logs.items()}


class TokenizerTrainStep:
    """Stage-0 step: tokenizer forward, discriminator update, then L_vq backward and the tokenizer update."""

    def __init__(
        self,
        tokenizer: VQTokenizer,
        loss: VQLoss,
        discriminator_step: DiscriminatorStep | None,
        optimizer: torch.optim.Optimizer,
        ema: ModelEMA | None = None,
        grad_clip: float | None = None,
    ) -> None:
        if discriminator_step is None and loss.config.gan_weight > 0:
            raise ValueError(
                f"VQLossConfig.gan_weight={loss.config.gan_weight} needs a DiscriminatorStep; pass one or set gan_weight=0"
            )
        self.tokenizer = tokenizer
        self.loss = loss
        self.discriminator_step = discriminator_step
        self.optimizer = optimizer
        self.ema = ema
        self.grad_clip = grad_clip

    def step(self, images: torch.Tensor, step: int) -> dict[str, float]:
        self.tokenizer.train()
        output = self.tokenizer(images)
        logs: dict[str, float] = {}
        discriminator = None
        if self.discriminator_step is not None:
            logs.update(self.discriminator_step.step(images, output.reconstruction, step))
            discriminator = self.discriminator_step.discriminator
        self.optimizer.zero_grad(set_to_none=True)
        total, terms = self.loss.generator_loss(images, output, discriminator, step)
        total.backward()
        if self.grad_clip is not None:
            logs["gen/grad_norm"] = torch.nn.utils.clip_grad_norm_(
                self.tokenizer.parameters(), self.grad_clip
            ).item()
        self.optimizer.step()
        if self.ema is not None:
            self.ema.update(self.tokenizer)
        logs.update({f"gen/{name}": value.item() for name, value in terms.items()})
        logs.update({f"codes/{name}": value.item() for name, value in output.stats.items()})
        return logs
