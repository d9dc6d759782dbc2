"""The trainer's view of data_pipeline: a streaming loader of packed batches built from the stage config."""

from __future__ import annotations

import torch

from data_pipeline.loader import LoaderConfig, StreamingLoader
from data_pipeline.loader import build_train_loader as build_streaming_loader
from data_pipeline.text_tokenizer import TextTokenizer
from training.config import ConfigError
from training.run_config import TrainConfig
from training.stages import STAGES


def text_tokenizer(cfg: TrainConfig) -> TextTokenizer:
    if not cfg.data.text_tokenizer:
        raise ConfigError(
            "data.text_tokenizer is not set: give a sentencepiece model or an HF tokenizer directory"
        )
    tokenizer = TextTokenizer.load(cfg.data.text_tokenizer)
    if STAGES[cfg.stage.kind].with_llm and tokenizer.vocab_size > cfg.model.llm.vocab_size:
        raise ConfigError(
            f"data.text_tokenizer has {tokenizer.vocab_size} tokens but model.llm.vocab_size="
            f"{cfg.model.llm.vocab_size}; set model.llm.vocab_size >= {tokenizer.vocab_size}"
        )
    return tokenizer


def loader_config(
    cfg: TrainConfig, rank: int, world_size: int, datasets: list[str], weights, shuffle: bool
) -> LoaderConfig:
    return LoaderConfig(
        datasets=datasets,
        weights=weights,
        rank=rank,
        world_size=world_size,
        num_workers=cfg.data.num_workers,
        pack_streams=cfg.data.pack_streams,
        seed=cfg.train.seed,
        shuffle=shuffle,
        image_size=tuple(cfg.data.image_size),
        downsample=cfg.model.tokenizer.downsample_factor,
        seq_len=cfg.data.seq_len,
        micro_batch_size=cfg.train.micro_batch_size,
        caption_dropout=cfg.data.caption_dropout,
        max_skip_fraction=cfg.data.max_skip_fraction,
        pin_memory=torch.cuda.is_available(),
    )


def build_train_loader(cfg: TrainConfig, rank: int, world_size: int) -> StreamingLoader:
    """The stage's training stream: the mixture of cfg.data.train, sharded over ranks, with a resumable state."""
    lc = loader_config(
        cfg,
        rank,
        world_size,
        [d.path for d in cfg.data.train],
        [d.weight for d in cfg.data.train],
        cfg.data.shuffle,
    )
    return build_streaming_loader(lc, text_tokenizer(cfg))


def build_eval_loader(cfg: TrainConfig, rank: int, world_size: int) -> StreamingLoader:
    """The held-out stream (cfg.data.eval), unshuffled, sharded over ranks."""
    if not cfg.data.eval:
        raise ConfigError("train.eval_every > 0 needs data.eval (a held-out dataset directory)")
    lc = loader_config(cfg, rank, world_size, [cfg.data.eval], None, shuffle=False)
    return build_streaming_loader(lc, text_tokenizer(cfg))
