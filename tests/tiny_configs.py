"""Tiny stage configurations for tests: small enough for 2 CPU cores, every stage kind, on the `tiny_data` fixture."""

from __future__ import annotations

import copy
from pathlib import Path

import yaml

TINY_MODEL = {
    "llm": {
        "vocab_size": 256,
        "hidden_size": 32,
        "num_layers": 2,
        "num_heads": 4,
        "num_kv_heads": 2,
        "intermediate_size": 64,
        "max_position_embeddings": 256,
    },
    "tokenizer": {
        "base_channels": 8,
        "channel_mult": [1, 1, 2, 2],
        "norm_groups": 4,
        "z_channels": 16,
        "code_dim": 16,
        "codebook_size": 32,
        "loss": {"gan_weight": 0.1, "disc_ndf": 8, "disc_layers": 2},
    },
}

DATASET_FOR_KIND = {
    "tokenizer": "caption_train",
    "llm_pretrain": "text_train",
    "align": "caption_train",
    "ett": "caption_train",
    "chat_sft": "chat_train",
    "t2i": "t2i_train",
}


def merge(base: dict, update: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in update.items():
        out[key] = (
            merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
        )
    return out


def stage_config(kind: str, data_dir, out_dir, **sections) -> dict:
    """A complete stage config dict; `sections` are merged over it (e.g. schedule={"max_steps": 4})."""
    data_dir = Path(data_dir)
    config = {
        "stage": {"name": kind, "kind": kind},
        "model": copy.deepcopy(TINY_MODEL),
        "data": {
            "train": [{"path": str(data_dir / DATASET_FOR_KIND[kind])}],
            "eval": str(data_dir / "caption_heldout"),
            "text_tokenizer": str(data_dir / "tokenizer"),
            "image_size": [24, 48],
            "seq_len": 96,
        },
        "optim": {"lr": 3e-3},
        "schedule": {"max_steps": 6, "warmup_ratio": 0.0, "kind": "constant"},
        "train": {
            "global_batch_size": 8,
            "micro_batch_size": 2,
            "output_dir": str(out_dir),
            "log_every": 1,
            "progress": False,
        },
        "checkpoint": {"save_every": 0, "keep_last": 3},
    }
    return merge(config, sections)


def write_stage_config(path, kind: str, data_dir, out_dir, **sections) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(stage_config(kind, data_dir, out_dir, **sections), sort_keys=False))
    return path
