"""Configuration of the VQ image tokenizer and of its training objective (docs/method.md).

Defaults are the demo's tiny CPU tokenizer (downsample 8, 16 base channels, D=32, K=256, IBQ + entropy loss). The paper-scale IBQ tokenizer is
`base_channels=128, channel_mult=(1, 1, 2, 2, 4), num_res_blocks=4, attn_resolutions=(16,), z_channels=256,
code_dim=256, codebook_size=131072, norm_groups=32, resolution=256`, with `loss.perceptual_weight=1.0`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal


@dataclass
class VQLossConfig:
    """Weights of L_vq = L_rec + L_quant + L_lpips + gan_weight * L_GAN + entropy_weight * L_entropy (Eq. 1).

    A weight of 0 skips its term (it is logged as 0). `perceptual_weight` defaults to 0 because LPIPS needs VGG16 and
    LPIPS-head weights from a local file (`perceptual_weights_path`, see perceptual.py) and nothing is downloaded;
    the paper uses 1.0. The discriminator's norm defaults to GroupNorm: pix2pix's BatchNorm makes the replicated
    discriminator depend on each rank's batch statistics and on real/fake batches being passed separately.
    """

    l1_weight: float = 1.0
    l2_weight: float = 0.0
    perceptual_weight: float = 0.0
    perceptual_weights_path: str | None = None
    quant_weight: float = 1.0
    entropy_weight: float = 0.05
    gan_weight: float = 0.1
    gan_start_step: int = 0
    lecam_weight: float = 0.05
    lecam_decay: float = 0.999
    disc_ndf: int = 64
    disc_layers: int = 3
    disc_norm: Literal["group", "batch", "none"] = "group"


@dataclass
class TokenizerConfig:
    """VQGAN-style encoder/decoder around an IBQ or VQ quantizer.

    `vq_output_l2_normalize` (VQ only; default off) L2-normalises the selected codes (the quantizer's output and
    `embed`) while the nearest-code lookup stays on the raw z and codebook: transformers' `JanusVQVAE` does this
    (its quantizer's forward looks up raw codes, its decode path `get_codebook_entry` normalises them);
    training/import_tokenizer.py sets it for Janus imports.

    `resolution` is the nominal training resolution: a level whose (square) size is in `attn_resolutions` gets
    self-attention, as in taming-transformers; the mid block always has attention at the lowest resolution.
    Any image size divisible by `downsample_factor` is accepted.
    """

    resolution: int = 32
    in_channels: int = 3
    base_channels: int = 16
    channel_mult: tuple[int, ...] = (1, 2, 2, 4)
    num_res_blocks: int = 1
    attn_resolutions: tuple[int, ...] = ()
    norm_groups: int = 8
    z_channels: int = 32
    code_dim: int = 32
    codebook_size: int = 256
    quantizer: Literal["ibq", "vq"] = "ibq"
    vq_l2_normalize: bool = False
    vq_output_l2_normalize: bool = False
    beta: float = 0.25
    entropy_temperature: float = 0.01
    loss: VQLossConfig = field(default_factory=VQLossConfig)

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.channel_mult) - 1)

    def validate(self) -> None:
        """Raise ValueError naming the field when the architecture cannot be built."""
        if not self.channel_mult:
            raise ValueError(
                "TokenizerConfig.channel_mult is empty: give one multiplier per resolution level"
            )
        if self.quantizer not in ("ibq", "vq"):
            raise ValueError(f"TokenizerConfig.quantizer must be 'ibq' or 'vq', got {self.quantizer!r}")
        if self.vq_output_l2_normalize and self.quantizer != "vq":
            raise ValueError("TokenizerConfig.vq_output_l2_normalize needs quantizer='vq'")
        channels = [self.base_channels * m for m in self.channel_mult] + [self.base_channels]
        bad = [c for c in channels if c % self.norm_groups]
        if bad:
            raise ValueError(
                f"TokenizerConfig.norm_groups={self.norm_groups} does not divide the channel counts {sorted(set(bad))} "
                f"(base_channels={self.base_channels}, channel_mult={list(self.channel_mult)})"
            )
        for name in ("codebook_size", "code_dim", "z_channels", "num_res_blocks", "in_channels"):
            if getattr(self, name) < 1:
                raise ValueError(f"TokenizerConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.entropy_temperature <= 0:
            raise ValueError(
                f"TokenizerConfig.entropy_temperature must be > 0, got {self.entropy_temperature}"
            )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TokenizerConfig:
        """Inverse of `to_dict` (JSON lists become tuples); unknown keys raise ValueError naming them."""
        data = dict(data)
        loss = data.pop("loss", {})
        _check_keys(cls, data, "TokenizerConfig")
        _check_keys(VQLossConfig, loss, "TokenizerConfig.loss")
        for name in ("channel_mult", "attn_resolutions"):
            if name in data:
                data[name] = tuple(data[name])
        return cls(**data, loss=VQLossConfig(**loss))


def _check_keys(cls: type, data: dict[str, Any], where: str) -> None:
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f"{where}: unknown keys {unknown}; expected a subset of {sorted(known)}")
