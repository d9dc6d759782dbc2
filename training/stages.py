"""Stage recipes: what each stage kind builds, trains and starts from (DESIGN.md decision 1, ett_spec.md §2 table).

| kind         | built                           | trainable                                   | objective              |
|--------------|---------------------------------|---------------------------------------------|------------------------|
| tokenizer    | tokenizer (+ discriminator)      | tokenizer                                   | L_vq                   |
| llm_pretrain | LLM                             | LLM                                         | next-token CE          |
| align        | tokenizer, projector, LLM        | projector (or index embedding)              | L_cap                  |
| ett          | tokenizer, projector, LLM (+ D)  | tokenizer (if train_tokenizer), projector, LLM | L_cap + alpha L_vq  |
| chat_sft     | tokenizer, projector, LLM        | projector, LLM                              | CE on assistant turns  |
| t2i          | tokenizer, projector, LLM, head  | projector, LLM, visual head                 | CE over K code ids     |

A stage starts from the previous stage's hand-off directory (`stage.init_from`, the export layout of
training/export.py), never from a live engine: ZeRO-3 fixes the trainable set at `deepspeed.initialize`.
"""

from __future__ import annotations

import torch

from modeling.ett import ETTModel
from training.config import ConfigError
from training.run_config import TrainConfig

TRAINABLE_PREFIXES = {
    "tokenizer": ("tokenizer.",),
    "llm_pretrain": ("llm.",),
    "align": ("projector.", "index_embedding."),
    "ett": ("tokenizer.", "projector.", "index_embedding.", "llm."),
    "chat_sft": ("projector.", "index_embedding.", "llm."),
    "t2i": ("projector.", "index_embedding.", "llm.", "visual_head."),
}


def trainable_prefixes(cfg: TrainConfig) -> tuple[str, ...]:
    prefixes = TRAINABLE_PREFIXES[cfg.stage.kind]
    if cfg.stage.kind == "ett" and not cfg.model.ett.train_tokenizer:
        prefixes = tuple(p for p in prefixes if p != "tokenizer.")
    return prefixes


def build_model(cfg: TrainConfig) -> ETTModel:
    """Build the stage's model (call inside engine.model_init_context) and fix its trainable set."""
    kind = cfg.stage.kind
    model = ETTModel(
        cfg.model.llm,
        cfg.model.tokenizer,
        cfg.model.projector,
        cfg.model.ett,
        with_llm=kind != "tokenizer",
        with_tokenizer=kind != "llm_pretrain",
    )
    prefixes = trainable_prefixes(cfg)
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
    if cfg.stage.kind in ("align", "ett", "chat_sft", "t2i"):
        missing_parts = [p.rstrip(".") for p in required if not any(k.startswith(p) for k in state)]
        if missing_parts:
            raise ConfigError(
                f"stage.kind={cfg.stage.kind}: the starting weights have no {missing_parts} "
                f"(stage.init_from={cfg.stage.init_from}, stage.init_llm_from={cfg.stage.init_llm_from}, "
                f"stage.init_tokenizer_from={cfg.stage.init_tokenizer_from})"
            )
    state = {k: v for k, v in state.items() if k in dict(model.state_dict()) or k in model_keys}
    load_full_state_dict(model, state, strict_prefixes=required)


class ReplicatedDiscriminator:
    """The PatchGAN discriminator with its own Adam, replicated on every rank outside ZeRO (it is small).
    `update` is None when the stage keeps it frozen (stage 2 with model.ett.train_discriminator=false): it then
    only scores reconstructions for the generator's L_GAN."""

    WEIGHTS, OPTIMIZER = "discriminator.safetensors", "discriminator_optim.pt"

    def __init__(self, discriminator, update) -> None:
        self.discriminator = discriminator
        self.update = update

    def save(self, directory) -> None:
        from pathlib import Path

        from safetensors.torch import save_file

        directory = Path(directory)
        save_file(
            {k: v.contiguous() for k, v in self.discriminator.state_dict().items()},
            str(directory / self.WEIGHTS),
        )
        if self.update is not None:
            torch.save(self.update.optimizer.state_dict(), directory / self.OPTIMIZER)

    def load(self, directory) -> None:
        from pathlib import Path

        from safetensors.torch import load_file

        directory = Path(directory)
        self.discriminator.load_state_dict(load_file(str(directory / self.WEIGHTS)))
        if self.update is not None and (directory / self.OPTIMIZER).is_file():
            self.update.optimizer.load_state_dict(torch.load(directory / self.OPTIMIZER, weights_only=True))


def build_discriminator(
    cfg: TrainConfig, model: ETTModel, device: torch.device | None = None
) -> ReplicatedDiscriminator | None:
    """The discriminator for stages that compute L_GAN (stage 0, and stage 2 while the tokenizer trains), else None.
    It stays fp32 on `device` (the engine's), outside ZeRO, with its own Adam."""
    from modeling.tokenizer import PatchDiscriminator
    from training.gan_step import DiscriminatorStep

    kind, loss_cfg = cfg.stage.kind, cfg.model.tokenizer.loss
    trains_tokenizer = kind == "tokenizer" or (
        kind == "ett" and cfg.model.ett.train_tokenizer and cfg.model.ett.alpha > 0
    )
    if not trains_tokenizer or loss_cfg.gan_weight <= 0:
        return None
    torch.manual_seed(cfg.train.seed + 1)
    discriminator = PatchDiscriminator(loss_cfg, cfg.model.tokenizer.in_channels)
    if cfg.stage.init_from:
        from training.export import load_discriminator

        load_discriminator(discriminator, cfg.stage.init_from)
    if device is not None:
        discriminator.to(device)
    train = kind == "tokenizer" or cfg.model.ett.train_discriminator
    discriminator.requires_grad_(train)
    update = None
    if train:
        optimizer = torch.optim.Adam(
            discriminator.parameters(), lr=cfg.optim.discriminator_lr, betas=cfg.optim.discriminator_betas
        )
        update = DiscriminatorStep(discriminator, model.vq_loss, optimizer)
    return ReplicatedDiscriminator(discriminator, update)


def stage_model_inputs(
    batch: dict, kind: str, device: torch.device | None = None, dtype: torch.dtype | None = None
) -> dict:
    """The tensors of a packed batch that the model's objective for `kind` reads, moved to `device` (the engine's;
    the loader yields CPU tensors) with floating tensors (the images) cast to `dtype` (the engine's compute dtype:
    DeepSpeed's bf16 engine holds bf16 weights and does not cast inputs). None leaves device or dtype unchanged."""
    keys = {
        "tokenizer": ("images",),
        "llm_pretrain": ("input_ids", "labels", "position_ids", "segment_ids"),
    }.get(
        kind,
        ("input_ids", "labels", "position_ids", "segment_ids", "images", "image_mask", "image_loss_mask"),
    )
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


def write_handoff(
    model: ETTModel, cfg: TrainConfig, out_dir, provenance: dict, rank: int, discriminator=None
) -> None:
    """Gather the full weights (every rank takes part) and write the export layout on rank 0."""
    from training.engine import gather_full_state_dict
    from training.export import write_export

    state = gather_full_state_dict(model, rank)
    if rank == 0:
        disc_state = (
            {k: v.detach().cpu() for k, v in discriminator.state_dict().items()}
            if discriminator is not None
            else None
        )
        write_export(state, cfg, out_dir, provenance, discriminator_state=disc_state)
