"""The configuration of one training stage (`python -m training.train --config STAGE.yaml key=value ...`).

Sections: `stage` (what this stage trains and where it starts from), `model` (LLM, tokenizer, projector, ETT
options), `data`, `optim`, `schedule`, `train` (batching, precision, logging cadence), `checkpoint`, `deepspeed`.
`TrainConfig.validate()` rejects incompatible combinations before any computation, naming the options.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from modeling.ett import ETTConfig
from modeling.llm import LLMConfig
from modeling.llm.model import RUNTIME_OPTIONS
from modeling.projector import ProjectorConfig
from modeling.tokenizer import TokenizerConfig
from training.config import ConfigError, to_dict
from training.stages import STAGES, StageKind


@dataclass
class StageConfig:
    """One stage of a recipe: its kind (training/stages.py), where it starts from, and what trains in it.

    `init_from` is the previous stage's hand-off directory (an export, see training/export.py); `init_llm_from` /
    `init_tokenizer_from` load single components (e.g. from hf_import or a stage-0 tokenizer) into a fresh model.
    `alpha`: the weight of L_vq in ETT's L = L_cap + alpha * L_vq. `train_tokenizer` (ett): false freezes the
    tokenizer (the paper's frozen-tokenizer baselines). `train_discriminator` (ett): false keeps the
    discriminator fixed; it still scores reconstructions for L_GAN."""

    name: str = "stage"
    kind: StageKind = "ett"
    init_from: str | None = None
    init_llm_from: str | None = None
    init_tokenizer_from: str | None = None
    alpha: float = 0.25
    train_tokenizer: bool = True
    train_discriminator: bool = True


@dataclass
class ModelConfig:
    llm: LLMConfig = field(default_factory=LLMConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    projector: ProjectorConfig = field(default_factory=ProjectorConfig)
    ett: ETTConfig = field(default_factory=ETTConfig)


@dataclass
class DatasetSpec:
    path: str = ""
    weight: float = 1.0


@dataclass
class DataConfig:
    train: list[DatasetSpec] = field(default_factory=list)
    eval: str | None = None
    text_tokenizer: str | None = None
    image_size: tuple[int, int] = (32, 32)
    seq_len: int = 128
    num_workers: int = 0
    shuffle: bool = True
    caption_dropout: float = 0.0
    max_skip_fraction: float = 0.05


@dataclass
class ParamGroupConfig:
    """Parameters whose name starts with `prefix` (e.g. "tokenizer.", "projector.") get this lr / weight decay."""

    prefix: str = ""
    lr: float | None = None
    weight_decay: float | None = None


@dataclass
class OptimConfig:
    lr: float = 1e-4
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    grad_clip: float = 1.0
    param_groups: list[ParamGroupConfig] = field(default_factory=list)
    discriminator_lr: float = 1e-4
    discriminator_betas: tuple[float, float] = (0.5, 0.9)


@dataclass
class ScheduleConfig:
    max_steps: int = 100
    warmup_ratio: float = 0.03
    min_lr_ratio: float = 0.1
    kind: Literal["cosine", "constant"] = "cosine"


@dataclass
class TrainLoopConfig:
    global_batch_size: int = 8
    micro_batch_size: int = 4
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    seed: int = 1234
    log_every: int = 10
    eval_every: int = 0
    eval_batches: int = 8
    output_dir: str = "runs/stage"
    max_consecutive_nonfinite: int = 5
    progress: bool = True


@dataclass
class CheckpointConfig:
    save_every: int = 0
    keep_last: int = 2
    resume: str = "auto"


@dataclass
class DeepSpeedSection:
    """Fills the "auto" fields of the DeepSpeed JSON. `param_persistence_threshold`: ZeRO-3 keeps parameters with
    fewer elements than this unpartitioned on every rank (norms, biases, small convolutions), so they are not
    fetched on every call; DeepSpeed's own default, 100,000."""

    config: str = "ds_configs/zero3.json"
    zero_stage: int | None = None
    param_persistence_threshold: int = 100_000
    reduce_bucket_size: int = 50_000_000


@dataclass
class TrainConfig:
    stage: StageConfig = field(default_factory=StageConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    train: TrainLoopConfig = field(default_factory=TrainLoopConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    deepspeed: DeepSpeedSection = field(default_factory=DeepSpeedSection)

    def validate(self) -> None:
        """Reject incompatible options before any computation; every message names the options involved."""
        kind, spec = self.stage.kind, STAGES[self.stage.kind]
        if self.stage.alpha < 0:
            raise ConfigError(f"stage.alpha must be >= 0, got {self.stage.alpha}")
        if self.model.ett.visual_input == "index" and spec.trains_tokenizer(self.stage) and spec.with_llm:
            raise ConfigError(
                "model.ett.visual_input=index with stage.train_tokenizer=true: the index path feeds discrete "
                "code ids, so no gradient can reach the tokenizer; set stage.train_tokenizer=false"
            )
        factor = self.model.tokenizer.downsample_factor
        height, width = self.data.image_size
        if spec.with_tokenizer and (height % factor or width % factor):
            raise ConfigError(
                f"data.image_size={list(self.data.image_size)} is not divisible by the tokenizer's downsample factor "
                f"{factor} (model.tokenizer.channel_mult={list(self.model.tokenizer.channel_mult)})"
            )
        if self.train.global_batch_size % self.train.micro_batch_size:
            raise ConfigError(
                f"train.global_batch_size={self.train.global_batch_size} is not a multiple of "
                f"train.micro_batch_size={self.train.micro_batch_size}"
            )
        if self.schedule.max_steps <= 0:
            raise ConfigError(f"schedule.max_steps must be > 0, got {self.schedule.max_steps}")
        if spec.needs_init and not (self.stage.init_from or self.stage.init_llm_from):
            raise ConfigError(
                f"stage.kind={kind} starts from a previous stage's weights: set stage.init_from (a hand-off "
                "directory) or stage.init_llm_from"
            )
        for option in ("init_from", "init_llm_from", "init_tokenizer_from"):
            path = getattr(self.stage, option)
            if path is not None and not Path(path).exists():
                raise ConfigError(
                    f"stage.{option}={path} does not exist: the previous stage's weights are missing "
                    "(run that stage first, or fix the path)"
                )
        if not self.data.train:
            raise ConfigError(
                "data.train is empty: list at least one dataset directory (data.train: [{path: DIR}])"
            )

    def fingerprint(self) -> str:
        """Hash of what gives a checkpoint its meaning: the stage kind and the shapes of what it holds (the model,
        and the discriminator's). Runtime options (activation checkpointing, the attention backend), loss weights
        and everything outside `model` may change on resume."""
        model = to_dict(self.model)
        for option in RUNTIME_OPTIONS:
            model["llm"].pop(option, None)
        loss = model["tokenizer"].pop("loss")
        model["discriminator"] = {k: v for k, v in loss.items() if k.startswith("disc_")}
        payload = {"stage": self.stage.kind, "model": model}
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]
