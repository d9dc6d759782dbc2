"""The configuration of one training stage (`python -m training.train --config STAGE.yaml key=value ...`).

Sections: `stage` (what this stage trains and where it starts from), `model` (LLM, tokenizer, projector, ETT
options), `data`, `optim`, `schedule`, `train` (batching, precision, logging cadence), `checkpoint`, `deepspeed`.
`TrainConfig.validate()` rejects incompatible combinations before any computation, naming the options;
`check_stage(cfg, world_size)` then checks what the stage would find at step 1 (datasets, hand-off directories,
the text tokenizer, the DeepSpeed config, the batch over the world size), with a named error for each problem.
`python -m training.train` and `python -m training.plan` both run it before anything is built.
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
    pack_streams: int | None = None
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

    def validate(self, check_paths: bool = True) -> None:
        """Reject incompatible options before any computation; every message names the options involved.
        `check_paths=False` skips the existence of the stage.init_* directories (a recipe's later stages start
        from outputs of earlier steps); `check_stage` checks every path, and what the directories hold."""
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
            if check_paths and path is not None and not Path(path).exists():
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


# ---- what the stage will find at step 1 ------------------------------------------------------------------------


@dataclass(frozen=True)
class StageProblem:
    """One thing that would make the stage fail at (or before) step 1. `name` is the error's name (e.g.
    DatasetNotFound), `option` the config key it concerns."""

    name: str
    option: str
    message: str

    def __str__(self) -> str:
        return f"{self.name}: {self.option}: {self.message}"


class StageCheckError(ConfigError):
    """check_stage found problems; `problems` lists them, the message names each."""

    def __init__(self, problems: list[StageProblem]) -> None:
        self.problems = list(problems)
        super().__init__("; ".join(str(p) for p in self.problems))


@dataclass(frozen=True)
class Producer:
    """A recipe step that will create a path: its name, and for a training step the components its hand-off will
    hold (export layout names: llm, vision_tokenizer, projector, ...; None: unknown)."""

    step: str
    components: tuple[str, ...] | None = None


HANDOFF_PARTS = {"llm": "llm", "tokenizer": "vision_tokenizer"}


def _producer(path: str, produced: dict[str, Producer]) -> Producer | None:
    resolved = Path(path).absolute()
    for prefix, producer in produced.items():
        root = Path(prefix).absolute()
        if resolved == root or root in resolved.parents:
            return producer
    return None


def handoff_components(path: str | Path) -> tuple[str, ...] | None:
    """The components a directory provides, read from its small JSON files only (no weights): an ETT export /
    hand-off (ett_config.json's components), a transformers LLM directory (config.json), our LLM format
    (llm_config.json), or a VQTokenizer directory (tokenizer_config.json). None: none of these."""
    import json as _json

    from training.export import EXPORT_CONFIG

    path = Path(path)
    if (path / EXPORT_CONFIG).is_file():
        try:
            return tuple(_json.loads((path / EXPORT_CONFIG).read_text()).get("components", ()))
        except ValueError:
            return None
    if (path / "config.json").is_file() or (path / "llm_config.json").is_file():
        return ("llm",)
    if (path / "tokenizer_config.json").is_file() and (path / "model.safetensors").is_file():
        return ("vision_tokenizer",)
    return None


def stage_problems(
    cfg: TrainConfig, world_size: int | None = None, produced: dict[str, Producer] | None = None
) -> tuple[list[StageProblem], list[str]]:
    """Everything check_stage checks, without raising: (problems, notes). A path that does not exist yet but that a
    recipe step will create (`produced`: path prefix -> Producer) is a note ("produced by step X"), not a problem;
    a produced hand-off is still checked for the components the stage needs."""
    from training.engine import resolve_ds_config_path

    produced = produced or {}
    spec = STAGES[cfg.stage.kind]
    problems: list[StageProblem] = []
    notes: list[str] = []

    def produced_note(option: str, path: str) -> Producer | None:
        producer = _producer(path, produced)
        if producer is not None:
            notes.append(f"{option}={path}: produced by step {producer.step}")
        return producer

    try:
        resolve_ds_config_path(cfg.deepspeed.config)
    except ConfigError as exc:
        problems.append(
            StageProblem("DeepSpeedConfigNotFound", "deepspeed.config", str(exc).split(": ", 1)[1])
        )
    micro, global_batch = cfg.train.micro_batch_size, cfg.train.global_batch_size
    if world_size is not None and global_batch % (micro * world_size):
        problems.append(
            StageProblem(
                "BatchNotDivisible",
                "train.global_batch_size",
                f"{global_batch} is not a multiple of train.micro_batch_size x world size = {micro} x "
                f"{world_size} = {micro * world_size}",
            )
        )
    datasets = [(f"data.train[{i}].path", d.path) for i, d in enumerate(cfg.data.train)]
    if cfg.train.eval_every and cfg.data.eval:
        datasets.append(("data.eval", cfg.data.eval))
    elif cfg.train.eval_every:
        problems.append(StageProblem("DatasetMissing", "data.eval", "train.eval_every > 0 needs data.eval"))
    for option, path in datasets:
        problems.extend(_dataset_problems(option, path, produced_note))
    problems.extend(_text_tokenizer_problems(cfg, spec, produced_note))
    problems.extend(_handoff_problems(cfg, spec, produced_note))
    return problems, notes


def _dataset_problems(option: str, path: str, produced_note) -> list[StageProblem]:
    from data_pipeline.shards import MANIFEST, read_manifest

    if not path:
        return [StageProblem("DatasetMissing", option, "empty path")]
    if not Path(path).exists():
        if produced_note(option, path) is not None:
            return []
        return [StageProblem("DatasetNotFound", option, f"{path} does not exist")]
    try:
        manifest = read_manifest(path)
    except (FileNotFoundError, ValueError) as exc:
        return [StageProblem("DatasetInvalid", option, str(exc))]
    if not manifest.get("num_samples"):
        return [StageProblem("DatasetEmpty", option, f"{Path(path) / MANIFEST} lists no samples")]
    missing = [s["path"] for s in manifest.get("shards", []) if not (Path(path) / s["path"]).is_file()]
    if missing:
        return [
            StageProblem("DatasetInvalid", option, f"{path}: shard files listed but missing: {missing[:5]}")
        ]
    return []


def _text_tokenizer_problems(cfg: TrainConfig, spec, produced_note) -> list[StageProblem]:
    path, option = cfg.data.text_tokenizer, "data.text_tokenizer"
    if not path:
        return [
            StageProblem(
                "TextTokenizerMissing",
                option,
                "not set: give a sentencepiece model or an HF tokenizer directory",
            )
        ]
    if not Path(path).exists():
        if produced_note(option, path) is not None:
            return []
        return [StageProblem("TextTokenizerNotFound", option, f"{path} does not exist")]
    from data_pipeline.text_tokenizer import TextTokenizer

    try:
        tokenizer = TextTokenizer.load(path)
    except (OSError, ValueError) as exc:
        return [StageProblem("TextTokenizerInvalid", option, str(exc))]
    if spec.with_llm and tokenizer.vocab_size > cfg.model.llm.vocab_size:
        return [
            StageProblem(
                "VocabTooSmall",
                "model.llm.vocab_size",
                f"{cfg.model.llm.vocab_size} < the {tokenizer.vocab_size} tokens of data.text_tokenizer={path}; "
                f"set model.llm.vocab_size >= {tokenizer.vocab_size}",
            )
        ]
    return []


def _handoff_problems(cfg: TrainConfig, spec, produced_note) -> list[StageProblem]:
    """The stage.init_* directories exist, are hand-offs / component directories, and together hold every component
    the stage loads (training/stages.py load_initial_weights: the LLM and the tokenizer where the stage has them)."""
    problems: list[StageProblem] = []
    provided: dict[str, str] = {}
    options = {"init_from": None, "init_llm_from": "llm", "init_tokenizer_from": "tokenizer"}
    for name, only in options.items():
        path = getattr(cfg.stage, name)
        if path is None:
            continue
        option = f"stage.{name}"
        producer = produced_note(option, path) if not Path(path).exists() else None
        if producer is not None:
            components = producer.components
            if components is None:
                components = tuple(HANDOFF_PARTS.values())
        elif not Path(path).exists():
            problems.append(StageProblem("HandoffNotFound", option, f"{path} does not exist"))
            continue
        else:
            components = handoff_components(path)
            if components is None:
                problems.append(
                    StageProblem(
                        "HandoffInvalid",
                        option,
                        f"{path} is neither a hand-off/export directory (ett_config.json) nor an LLM "
                        "(config.json, llm_config.json) or tokenizer (tokenizer_config.json) directory",
                    )
                )
                continue
        for part, component in HANDOFF_PARTS.items():
            if (only is None or only == part) and component in components:
                provided.setdefault(part, option)
        if only is not None and HANDOFF_PARTS[only] not in components:
            problems.append(
                StageProblem(
                    "HandoffIncomplete", option, f"{path} holds {list(components)}, no {only} weights"
                )
            )
    given = any(getattr(cfg.stage, name) for name in options)
    if spec.needs_init or given:
        required = [
            p for p, present in (("llm", spec.with_llm), ("tokenizer", spec.with_tokenizer)) if present
        ]
        missing = [p for p in required if p not in provided]
        if missing and not problems:
            sources = ", ".join(
                f"stage.{n}={getattr(cfg.stage, n)}" for n in options if getattr(cfg.stage, n)
            )
            problems.append(
                StageProblem(
                    "HandoffIncomplete",
                    "stage.init_from",
                    f"stage.kind={cfg.stage.kind} loads {required} but the starting weights ({sources}) have no "
                    f"{missing}",
                )
            )
    return problems


def check_stage(
    cfg: TrainConfig, world_size: int | None = None, produced: dict[str, Producer] | None = None
) -> list[str]:
    """Raise StageCheckError (a ConfigError) naming every problem stage_problems finds; returns its notes."""
    problems, notes = stage_problems(cfg, world_size, produced)
    if problems:
        raise StageCheckError(problems)
    return notes
