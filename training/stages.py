"""The stage registry: one StageSpec per stage kind, and everything built from it. Every stage-kind decision in the
project reads a StageSpec; nothing else compares kind strings.

| kind         | built                    | trainable                                     | objective                 |
|--------------|--------------------------|-----------------------------------------------|---------------------------|
| tokenizer    | tokenizer (+ D)          | tokenizer                                     | L_vq                      |
| llm_pretrain | LLM                      | LLM                                           | next-token CE             |
| align        | tokenizer, projector, LLM | projector (or index embedding)               | L_cap                     |
| ett          | tokenizer, projector, LLM (+ D) | tokenizer (stage.train_tokenizer), projector, LLM | L_cap + alpha L_vq |
| chat_sft     | tokenizer, projector, LLM | projector, LLM                               | CE on assistant turns     |
| t2i          | tokenizer, projector, LLM, visual head | projector, LLM, visual head     | CE over the K code ids    |

A stage starts from the previous stage's hand-off directory (`stage.init_from`, the export layout of
training/export.py), never from a live engine: ZeRO-3 fixes the trainable set at `deepspeed.initialize`.
Adding a kind is one STAGES entry (and its objective in training/objectives.py).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import torch

from modeling.ett import ETTModel
from modeling.llm.model import DecoderLM, TransformerLayer
from modeling.tokenizer.encoder_decoder import Decoder, Encoder, Level, MidBlock
from training import objectives
from training.config import ConfigError

if TYPE_CHECKING:
    from training.run_config import StageConfig, TrainConfig

TEXT_KEYS = ("input_ids", "labels", "position_ids", "segment_ids")
IMAGE_TEXT_KEYS = (*TEXT_KEYS, "images", "image_mask")


@dataclass(frozen=True)
class StageSpec:
    """What one stage kind builds, trains and minimises.

    `trainable`: parameter-name prefixes that train; "tokenizer." drops out where `tokenizer_optional` and
    stage.train_tokenizer is false. `vq_weight`: the weight of L_vq in the stage's loss (None: the kind never
    computes L_vq; it then also runs only while the tokenizer trains). `discriminator_optional`: the discriminator
    trains only with stage.train_discriminator. `batch_keys`: the batch tensors the model's forward reads.
    `eval_objective`: the held-out caption metric (None: reconstruction metrics only). `needs_init`: starts from
    a previous stage's weights. `chat`: the model learnt the chat layout (inference prompts with it)."""

    kind: str
    with_llm: bool
    with_tokenizer: bool
    trainable: tuple[str, ...]
    batch_keys: tuple[str, ...]
    objective: Callable
    eval_objective: Callable | None
    needs_init: bool
    vq_weight: Callable[[StageConfig], float] | None = None
    tokenizer_optional: bool = False
    discriminator_optional: bool = False
    chat: bool = False

    @property
    def model_keys(self) -> tuple[str, ...]:
        """The batch keys the model's forward takes (the labels go to the objective only)."""
        return tuple(k for k in self.batch_keys if k != "labels")

    def trainable_prefixes(self, stage: StageConfig) -> tuple[str, ...]:
        if self.tokenizer_optional and not stage.train_tokenizer:
            return tuple(p for p in self.trainable if p != "tokenizer.")
        return self.trainable

    def trains_tokenizer(self, stage: StageConfig) -> bool:
        return "tokenizer." in self.trainable_prefixes(stage)

    def vq_loss_weight(self, stage: StageConfig) -> float:
        """The weight of L_vq in this stage's loss; 0 when L_vq is not computed."""
        if self.vq_weight is None or not self.trains_tokenizer(stage):
            return 0.0
        return self.vq_weight(stage)

    def trains_discriminator(self, stage: StageConfig) -> bool:
        return not self.discriminator_optional or stage.train_discriminator


STAGES: dict[str, StageSpec] = {
    spec.kind: spec
    for spec in (
        StageSpec(
            kind="tokenizer",
            with_llm=False,
            with_tokenizer=True,
            trainable=("tokenizer.",),
            batch_keys=("images",),
            objective=objectives.tokenizer_objective,
            eval_objective=None,
            needs_init=False,
            vq_weight=lambda stage: 1.0,
        ),
        StageSpec(
            kind="llm_pretrain",
            with_llm=True,
            with_tokenizer=False,
            trainable=("llm.",),
            batch_keys=TEXT_KEYS,
            objective=objectives.caption_objective,
            eval_objective=objectives.caption_objective,
            needs_init=False,
        ),
        StageSpec(
            kind="align",
            with_llm=True,
            with_tokenizer=True,
            trainable=("projector.", "index_embedding."),
            batch_keys=IMAGE_TEXT_KEYS,
            objective=objectives.caption_objective,
            eval_objective=objectives.caption_objective,
            needs_init=True,
        ),
        StageSpec(
            kind="ett",
            with_llm=True,
            with_tokenizer=True,
            trainable=("tokenizer.", "projector.", "index_embedding.", "llm."),
            batch_keys=IMAGE_TEXT_KEYS,
            objective=objectives.caption_objective,
            eval_objective=objectives.caption_objective,
            needs_init=True,
            vq_weight=lambda stage: stage.alpha,
            tokenizer_optional=True,
            discriminator_optional=True,
        ),
        StageSpec(
            kind="chat_sft",
            with_llm=True,
            with_tokenizer=True,
            trainable=("projector.", "index_embedding.", "llm."),
            batch_keys=IMAGE_TEXT_KEYS,
            objective=objectives.caption_objective,
            eval_objective=objectives.caption_objective,
            needs_init=True,
            chat=True,
        ),
        StageSpec(
            kind="t2i",
            with_llm=True,
            with_tokenizer=True,
            trainable=("projector.", "index_embedding.", "llm.", "visual_head."),
            batch_keys=(*IMAGE_TEXT_KEYS, "image_loss_mask"),
            objective=objectives.t2i_objective,
            eval_objective=objectives.t2i_objective,
            needs_init=True,
        ),
    )
}

StageKind = Literal[tuple(STAGES)]


def stage_spec(cfg: TrainConfig) -> StageSpec:
    return STAGES[cfg.stage.kind]


def build_model(cfg: TrainConfig) -> ETTModel:
    """The one model builder: the stage's ETTModel from its config, with its trainable set fixed (call inside
    engine.model_init_context for ZeRO-3). Used by training, export and inference."""
    spec = stage_spec(cfg)
    model = ETTModel(
        cfg.model.llm,
        cfg.model.tokenizer,
        cfg.model.projector,
        cfg.model.ett,
        with_llm=spec.with_llm,
        with_tokenizer=spec.with_tokenizer,
    )
    prefixes = spec.trainable_prefixes(cfg.stage)
    for name, param in model.named_parameters():
        param.requires_grad_(name.startswith(prefixes))
    return model


def register_zero3_external_parameters(model: ETTModel) -> None:
    """Parameters read as `.weight` outside their owning module's forward must be registered with the module that
    reads them, or ZeRO-3 hands that module an empty partition: the codebook (read by the quantizer's lookup
    kernels) and a tied LM head (read by the LLM's output projection)."""
    import deepspeed

    register_external_parameter = deepspeed.zero.register_external_parameter
    if hasattr(model, "tokenizer"):
        register_external_parameter(model.tokenizer.quantizer, model.tokenizer.codebook)
    if hasattr(model, "llm") and model.llm.config.tie_embeddings:
        register_external_parameter(model.llm, model.llm.embedding.word_embeddings.weight)


# ZeRO-3's units of gathering: each fetches, releases and prefetches its parameters as one (FSDP's per-layer wrapping).
ZERO3_BLOCKS = (TransformerLayer, Level, MidBlock)
# The modules that hold the blocks; each starts with a module that is not a block.
ZERO3_STACKS = (Encoder, Decoder, DecoderLM)


def set_zero3_blocks(model: ETTModel) -> None:
    """Mark every ZERO3_BLOCKS module a ZeRO-3 leaf (`deepspeed.utils.set_z3_leaf_modules`), before
    deepspeed.initialize. ZeRO-3 then hooks each block, not every nn.Module inside it: on the tiny benchmark model
    its per-module Python hooks were about half of a step. A block gathers the same parameters its modules would
    have gathered one by one, and DeepSpeed reduces the block's gradients once its backward is done. The gradients
    are then bitwise plain autograd's (tests/test_zero3_init.py); with per-module hooks they were up to 1e-5
    relative off.

    DeepSpeed runs that reduction in the block's full backward hook, which fires too early (before the block's own
    weight gradients exist) when no input of the block requires grad. So the projector is not a block, and a block
    that trains needs the first parameter of its stack (the encoder's or decoder's conv_in, the LLM's embedding) to
    train too, which holds when a stage trains whole components (STAGES' `trainable` prefixes); else ConfigError."""
    from deepspeed.utils import set_z3_leaf_modules

    for stack_name, stack in model.named_modules():
        if not isinstance(stack, ZERO3_STACKS):
            continue
        first_name, first = next(stack.named_parameters())
        if first.requires_grad:
            continue
        for name, block in stack.named_modules():
            if isinstance(block, ZERO3_BLOCKS) and any(p.requires_grad for p in block.parameters()):
                raise ConfigError(
                    f"{stack_name}.{name} trains but {stack_name}.{first_name} is frozen: under ZeRO-3 a block "
                    f"({stack_name}.{name}) needs an input that requires grad; train the whole component"
                )
    set_z3_leaf_modules(model, list(ZERO3_BLOCKS), raise_if_not_found=False)


def load_initial_weights(model: ETTModel, cfg: TrainConfig) -> None:
    """Load the stage's starting weights (hand-off directory, then single components) into a fresh model.
    Runs on every rank before deepspeed.initialize."""
    from training.engine import load_full_state_dict
    from training.export import load_component_state_dict, load_handoff_state_dict

    state: dict[str, torch.Tensor] = {}
    if cfg.stage.init_from:
        state.update(load_handoff_state_dict(cfg.stage.init_from))
    if cfg.stage.init_llm_from:
        state.update(
            {f"llm.{k}": v for k, v in load_component_state_dict(cfg.stage.init_llm_from, "llm").items()}
        )
    if cfg.stage.init_tokenizer_from:
        state.update(
            {
                f"tokenizer.{k}": v
                for k, v in load_component_state_dict(cfg.stage.init_tokenizer_from, "tokenizer").items()
            }
        )
    if not state:
        return
    model_keys = {name for name, _ in model.named_parameters()}
    required = tuple(p for p in ("llm.", "tokenizer.") if any(k.startswith(p) for k in model_keys))
    if stage_spec(cfg).needs_init:
        missing_parts = [p.rstrip(".") for p in required if not any(k.startswith(p) for k in state)]
        if missing_parts:
            raise ConfigError(
                f"stage.kind={cfg.stage.kind}: the starting weights have no {missing_parts} "
                f"(stage.init_from={cfg.stage.init_from}, stage.init_llm_from={cfg.stage.init_llm_from}, "
                f"stage.init_tokenizer_from={cfg.stage.init_tokenizer_from})"
            )
    state = {k: v for k, v in state.items() if k in dict(model.state_dict()) or k in model_keys}
    load_full_state_dict(model, state, strict_prefixes=required)


def build_loss_modules(cfg: TrainConfig, model: ETTModel, device: torch.device | None = None):
    """The stage's objective state, built outside zero.Init (never partitioned, never in the model's state dict):
    L_vq with LPIPS when the stage computes L_vq, and the discriminator (with its own Adam when it trains) when
    L_vq has a GAN term. Returns (LossModules, ReplicatedDiscriminator or None)."""
    from modeling.tokenizer import PatchDiscriminator
    from training.gan_step import DiscriminatorStep, ReplicatedDiscriminator

    spec, loss_cfg = stage_spec(cfg), cfg.model.tokenizer.loss
    weight = spec.vq_loss_weight(cfg.stage)
    if weight <= 0:
        return objectives.LossModules(), None
    vq_loss = objectives.VQLoss(cfg.model.tokenizer)
    if device is not None:
        vq_loss.to(device)
    if loss_cfg.gan_weight <= 0:
        return objectives.LossModules(vq_loss, weight), None
    torch.manual_seed(cfg.train.seed + 1)
    discriminator = PatchDiscriminator(loss_cfg, cfg.model.tokenizer.in_channels)
    if cfg.stage.init_from:
        from training.export import load_discriminator

        load_discriminator(discriminator, cfg.stage.init_from)
    if device is not None:
        discriminator.to(device)
    train = spec.trains_discriminator(cfg.stage)
    discriminator.requires_grad_(train)
    update = None
    if train:
        optimizer = torch.optim.Adam(
            discriminator.parameters(), lr=cfg.optim.discriminator_lr, betas=cfg.optim.discriminator_betas
        )
        update = DiscriminatorStep(discriminator, vq_loss, optimizer)
    losses = objectives.LossModules(vq_loss, weight, discriminator)
    return losses, ReplicatedDiscriminator(discriminator, vq_loss, update)


def model_inputs(
    batch: dict, keys: tuple[str, ...], device: torch.device | None = None, dtype: torch.dtype | None = None
) -> dict:
    """The tensors `keys` of a packed batch (a StageSpec's batch_keys), moved to `device` (the engine's; the loader
    yields CPU tensors, pinned on CUDA, so the copy does not block) with floating tensors (the images) cast to
    `dtype` (the engine's compute dtype: DeepSpeed's bf16 engine holds bf16 weights and does not cast inputs).
    None leaves device or dtype unchanged."""
    inputs = {k: batch[k] for k in keys if k in batch}
    if device is None and dtype is None:
        return inputs
    return {
        k: v.to(
            device=device,
            dtype=dtype if dtype is not None and v.is_floating_point() else None,
            non_blocking=v.is_pinned(),
        )
        for k, v in inputs.items()
    }
