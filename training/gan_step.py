"""The PatchGAN discriminator of tokenizer training, with its own optimizer, outside ZeRO.

IBQ's order within a step: the discriminator updates first (on real images and detached reconstructions), then the
tokenizer's update is the DeepSpeed engine's. The discriminator is small and stays replicated on every rank: its
gradients are averaged over ranks before its step, so the replicas stay equal. Used by stage 0 (tokenizer
pretraining) and by ETT stage 2 while the tokenizer trains (frozen there with stage.train_discriminator=false: it
then only scores reconstructions for the generator's L_GAN).
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from training.objectives import VQLoss


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

    def step(self, images: torch.Tensor, reconstruction: torch.Tensor, step: int) -> dict[str, torch.Tensor]:
        """images, reconstruction [B, 3, H, W] (the reconstruction is detached here) -> logged terms (detached
        tensors: no host sync here)."""
        self.discriminator.train()
        self.optimizer.zero_grad(set_to_none=True)
        loss, logs = self.loss.discriminator_loss(images, reconstruction.detach(), self.discriminator, step)
        if self.loss.gan_active(step):
            loss.backward()
            all_reduce_gradients(self.discriminator)
            self.optimizer.step()
        return {f"disc/{name}": value.detach() for name, value in logs.items()}


class ReplicatedDiscriminator:
    """The discriminator network and, when it trains, its update. Checkpointed by rank 0 (the replicas are equal);
    the LeCAM EMAs, which follow each rank's own logits, travel in the per-rank state (`rank_state`)."""

    WEIGHTS, OPTIMIZER = "discriminator.safetensors", "discriminator_optim.pt"

    def __init__(self, discriminator: nn.Module, loss: VQLoss, update: DiscriminatorStep | None) -> None:
        self.discriminator = discriminator
        self.loss = loss
        self.update = update

    def save(self, directory) -> None:
        from safetensors.torch import save_file

        directory = Path(directory)
        save_file(
            {k: v.contiguous() for k, v in self.discriminator.state_dict().items()},
            str(directory / self.WEIGHTS),
        )
        if self.update is not None:
            torch.save(self.update.optimizer.state_dict(), directory / self.OPTIMIZER)

    def load(self, directory) -> None:
        from safetensors.torch import load_file

        directory = Path(directory)
        self.discriminator.load_state_dict(load_file(str(directory / self.WEIGHTS)))
        if self.update is not None and (directory / self.OPTIMIZER).is_file():
            self.update.optimizer.load_state_dict(torch.load(directory / self.OPTIMIZER, weights_only=True))

    def rank_state(self) -> dict[str, list[float]]:
        return {k: v.flatten().tolist() for k, v in self.loss.lecam.state_dict().items()}

    def load_rank_state(self, state: dict[str, list[float]]) -> None:
        lecam = self.loss.lecam
        lecam.load_state_dict(
            {k: torch.tensor(state[k], dtype=v.dtype).view_as(v) for k, v in lecam.state_dict().items()}
        )
