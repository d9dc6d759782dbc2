"""The training objectives: what each stage minimises, computed from the model's outputs (modeling/ett.py returns
outputs, never losses). The stage registry (training/stages.py) names one objective per stage kind.

Caption / LM loss (ETT Eq. 2): mean next-token CE over the positions whose label is not -100.
Tokenizer loss (Eq. 1): L_vq = l1 * |x - x^| + l2 * (x - x^)^2 + quant * L_quant + perceptual * LPIPS(x, x^)
                  + gan * L_GAN + entropy * L_entropy,
with L_GAN = softplus(-mean_patches D(x^)) averaged over images (non-saturating, fixed weight, IBQ) from
`gan_start_step` on. Discriminator: 0.5 (mean relu(1 - D(x)) + mean relu(1 + D(x^))) + lecam * R_LeCAM with
R_LeCAM = mean relu(D(x) - ema_fake)^2 + mean relu(ema_real - D(x^))^2 and EMAs of the mean logits (decay 0.999).
ETT (Eq. 3): L = L_cap + alpha * L_vq, L_vq through the decoder of the same straight-through codes the LLM read.
Text-to-image: CE of the visual head over the K code ids at the positions that predict an image code.
With model.ett.fused_head_loss (the default) the model returns hidden states and its heads instead of logits, and the
objectives call the heads (the LLM's head mode, the visual head) for the fused linear CE: a module call, so that
ZeRO-3 gathers the head weight for it, and the [tokens, V] logits never exist.

Every objective returns a StepOutput with each term detached for logging. The loss modules (LPIPS, LeCAM's EMAs)
are built outside the model, so they are never partitioned by ZeRO-3 and never part of a checkpoint's weights.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from modeling.ett import ETTOutput
from modeling.tokenizer.config import TokenizerConfig, VQLossConfig
from modeling.tokenizer.perceptual import LPIPS
from modeling.tokenizer.tokenizer import TokenizerOutput


@contextmanager
def frozen(module: nn.Module):
    """Run `module` without recording gradients for its parameters (they still flow to its inputs)."""
    flags = [p.requires_grad for p in module.parameters()]
    module.requires_grad_(False)
    try:
        yield module
    finally:
        for p, flag in zip(module.parameters(), flags):
            p.requires_grad_(flag)


def hinge_discriminator_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def non_saturating_generator_loss(logits_fake: torch.Tensor) -> torch.Tensor:
    """softplus(-l) = -log sigmoid(l) of each image's mean patch logit, averaged over the batch."""
    return F.softplus(-logits_fake.flatten(1).mean(dim=1)).mean()


class LeCAM(nn.Module):
    """LeCAM regulariser (Tseng et al. 2021) with EMAs of the discriminator's mean real and fake logits (buffers)."""

    def __init__(self, decay: float) -> None:
        super().__init__()
        self.decay = decay
        self.register_buffer("ema_real", torch.zeros(()))
        self.register_buffer("ema_fake", torch.zeros(()))

    def forward(self, logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
        """Update the EMAs with this batch's mean logits, then return the regulariser."""
        with torch.no_grad():
            self.ema_real.lerp_(logits_real.mean().float(), 1.0 - self.decay)
            self.ema_fake.lerp_(logits_fake.mean().float(), 1.0 - self.decay)
        return (
            F.relu(logits_real - self.ema_fake).pow(2).mean()
            + F.relu(self.ema_real - logits_fake).pow(2).mean()
        )


class VQLoss(nn.Module):
    """Both GAN-tokenizer objectives. Holds the frozen LPIPS network (when perceptual_weight > 0) and the LeCAM
    EMAs; the discriminator is passed in, since it is trained by its own optimizer outside the main engine."""

    def __init__(self, config: TokenizerConfig | VQLossConfig) -> None:
        super().__init__()
        self.config = config.loss if isinstance(config, TokenizerConfig) else config
        for name in (
            "l1_weight",
            "l2_weight",
            "perceptual_weight",
            "quant_weight",
            "entropy_weight",
            "gan_weight",
        ):
            if getattr(self.config, name) < 0:
                raise ValueError(f"VQLossConfig.{name} must be >= 0, got {getattr(self.config, name)}")
        self.perceptual = None
        if self.config.perceptual_weight > 0:
            if not self.config.perceptual_weights_path:
                raise FileNotFoundError(
                    f"VQLossConfig.perceptual_weight={self.config.perceptual_weight} needs "
                    "VQLossConfig.perceptual_weights_path (VGG16 + LPIPS weights), which is not set; "
                    "set it or use perceptual_weight=0"
                )
            self.perceptual = LPIPS.from_file(
                self.config.perceptual_weights_path, "VQLossConfig.perceptual_weights_path"
            )
        self.lecam = LeCAM(self.config.lecam_decay)

    def gan_active(self, step: int) -> bool:
        return self.config.gan_weight > 0 and step >= self.config.gan_start_step

    def generator_loss(
        self, images: torch.Tensor, output: TokenizerOutput, discriminator: nn.Module | None, step: int
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """images [B, 3, H, W] and the tokenizer output -> (L_vq scalar, unweighted named terms, detached)."""
        cfg, rec = self.config, output.reconstruction
        if rec.shape != images.shape:
            raise ValueError(
                f"reconstruction shape {list(rec.shape)} differs from images shape {list(images.shape)}"
            )
        zero = images.new_zeros(())
        terms: dict[str, torch.Tensor] = {}
        terms["l1"] = (images - rec).abs().mean() if cfg.l1_weight > 0 else zero
        terms["l2"] = (images - rec).pow(2).mean() if cfg.l2_weight > 0 else zero
        terms["perceptual"] = self.perceptual(images, rec).mean() if self.perceptual is not None else zero
        terms["quant"] = output.quant_losses["quant"] if cfg.quant_weight > 0 else zero
        terms["entropy"] = output.quant_losses["entropy"] if cfg.entropy_weight > 0 else zero
        if self.gan_active(step):
            if discriminator is None:
                raise ValueError(
                    f"gan_weight={cfg.gan_weight} at step {step} >= gan_start_step needs a discriminator"
                )
            with frozen(discriminator):
                terms["gan"] = non_saturating_generator_loss(discriminator(rec))
        else:
            terms["gan"] = zero
        total = (
            cfg.l1_weight * terms["l1"]
            + cfg.l2_weight * terms["l2"]
            + cfg.perceptual_weight * terms["perceptual"]
            + cfg.quant_weight * terms["quant"]
            + cfg.gan_weight * terms["gan"]
            + cfg.entropy_weight * terms["entropy"]
        )
        logs = {name: value.detach() for name, value in terms.items()}
        logs["total"] = total.detach()
        return total, logs

    def discriminator_loss(
        self, images: torch.Tensor, reconstruction: torch.Tensor, discriminator: nn.Module, step: int
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Hinge + lecam_weight * LeCAM on real images and detached reconstructions -> (scalar, named terms).
        Before `gan_start_step` (or with gan_weight 0) returns a zero loss with no graph and logs zeros."""
        zero = images.new_zeros(())
        if not self.gan_active(step):
            return zero, {
                "disc": zero,
                "hinge": zero,
                "lecam": zero,
                "logits_real": zero,
                "logits_fake": zero,
            }
        logits_real = discriminator(images.detach())
        logits_fake = discriminator(reconstruction.detach())
        hinge = hinge_discriminator_loss(logits_real, logits_fake)
        lecam = self.lecam(logits_real, logits_fake) if self.config.lecam_weight > 0 else zero
        total = hinge + self.config.lecam_weight * lecam
        logs = {
            "disc": total.detach(),
            "hinge": hinge.detach(),
            "lecam": lecam.detach(),
            "logits_real": logits_real.detach().mean(),
            "logits_fake": logits_fake.detach().mean(),
        }
        return total, logs


class StepOutput(NamedTuple):
    """The loss to minimise, every term (detached, for logging), the detached reconstruction when L_vq ran (for the
    discriminator update), and token accuracy counts."""

    loss: torch.Tensor
    terms: dict[str, torch.Tensor]
    reconstruction: torch.Tensor | None = None
    token_correct: torch.Tensor | None = None
    token_count: torch.Tensor | None = None


class LossModules(NamedTuple):
    """What an objective needs besides the model's outputs: L_vq (None when the stage computes none), its weight
    in the stage's loss, and the discriminator scoring reconstructions for L_GAN (None without one)."""

    vq_loss: VQLoss | None = None
    vq_weight: float = 0.0
    discriminator: nn.Module | None = None


def caption_loss(logits: torch.Tensor, labels: torch.Tensor):
    """logits [B, S, V], labels [B, S] (-100 = no loss) -> (mean CE, correct argmax count, counted tokens)."""
    flat_logits = logits.reshape(-1, logits.shape[-1]).float()
    flat_labels = labels.reshape(-1)
    valid = flat_labels != -100
    count = valid.sum()
    loss = F.cross_entropy(flat_logits, flat_labels, ignore_index=-100, reduction="sum") / count.clamp(min=1)
    with torch.no_grad():
        correct = ((flat_logits.argmax(-1) == flat_labels) & valid).sum()
    return loss, correct, count


def caption_totals(out: ETTOutput, labels: torch.Tensor):
    """(mean CE, correct argmax count, counted tokens) of the LM head: from the model's logits, or, with
    model.ett.fused_head_loss, by the LLM's head mode (fused linear CE on its hidden states, no logits)."""
    if out.logits is not None:
        return caption_loss(out.logits, labels)
    totals = out.llm(head_hidden=out.hidden_states, labels=labels)
    return totals.loss_sum / totals.count.clamp(min=1), totals.correct, totals.count


def _vq_terms(images, output: TokenizerOutput, losses: LossModules, step: int):
    """L_vq (Eq. 1) of a tokenizer output -> (scalar, logged terms)."""
    total, named = losses.vq_loss.generator_loss(images, output, losses.discriminator, step)
    terms = {f"vq/{k}": v.detach() for k, v in named.items()}
    for key, value in output.stats.items():
        terms[f"codebook/{key}"] = torch.as_tensor(value).detach().float()
    return total, terms


def tokenizer_objective(out: ETTOutput, batch: dict, losses: LossModules, step: int) -> StepOutput:
    """Stage 0: L_vq of the tokenizer's own forward."""
    total, terms = _vq_terms(batch["images"], out.tokenizer, losses, step)
    terms = {"loss/vq": total.detach(), **terms}
    return StepOutput(loss=total, terms=terms, reconstruction=out.tokenizer.reconstruction.detach())


def caption_objective(out: ETTOutput, batch: dict, losses: LossModules, step: int) -> StepOutput:
    """L_cap (Eq. 2), plus vq_weight * L_vq (Eq. 3) when the forward decoded the codes the LLM read."""
    loss, correct, count = caption_totals(out, batch["labels"])
    if out.tokenizer is None:
        terms = {"loss/caption": loss.detach()}
        return StepOutput(loss=loss, terms=terms, token_correct=correct, token_count=count)
    vq, vq_terms = _vq_terms(batch["images"], out.tokenizer, losses, step)
    terms = {"loss/caption": loss.detach(), **vq_terms, "loss/vq": vq.detach()}
    return StepOutput(
        loss=loss + losses.vq_weight * vq,
        terms=terms,
        reconstruction=out.tokenizer.reconstruction.detach(),
        token_correct=correct,
        token_count=count,
    )


def t2i_objective(out: ETTOutput, batch: dict, losses: LossModules, step: int) -> StepOutput:
    """Next-code CE over K at the positions that predict an image code (Emu3-style, tokenizer frozen); the visual
    head's fused CE totals with model.ett.fused_head_loss, else from its logits."""
    if out.visual_head is not None:
        loss_sum, correct, count = out.visual_head(out.visual_hidden, out.visual_targets)
        loss = loss_sum / count.clamp(min=1)
    else:
        logits, targets = out.visual_logits.float(), out.visual_targets
        loss = F.cross_entropy(logits, targets)
        with torch.no_grad():
            correct = (logits.argmax(-1) == targets).sum()
        count = torch.tensor(targets.numel())
    return StepOutput(loss=loss, terms={"loss/t2i": loss.detach()}, token_correct=correct, token_count=count)
