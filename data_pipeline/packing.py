"""Greedy sequential packing of processed samples into fixed-length rows, and the packed batch dict.

Samples are placed in arrival order: a sample goes into the open row if it fits, otherwise it opens the next row;
when a sample would open row B+1, the B closed rows are emitted as one micro-batch. The pending buffer (samples in
rows not yet emitted) is therefore a pure function of the sample sequence: re-adding the pending samples to an
empty packer rebuilds it exactly, which is how a resume restores it (only the sample keys are checkpointed).

A sample longer than `seq_len` is truncated (never inside an image span: the cut moves to before the span's
IMAGE_START) or dropped, by `overlong`; both are counted.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

from data_pipeline.processing import IGNORE, ProcessedSample, SkipSample


@dataclass
class PackConfig:
    seq_len: int = 128
    micro_batch_size: int = 4
    overlong: Literal["truncate", "drop"] = "truncate"

    def __post_init__(self):
        if self.seq_len < 2 or self.micro_batch_size < 1:
            raise ValueError(
                f"seq_len={self.seq_len} must be >= 2 and micro_batch_size={self.micro_batch_size} >= 1"
            )
        if self.overlong not in ("truncate", "drop"):
            raise ValueError(f"overlong={self.overlong!r}: expected 'truncate' or 'drop'")


def truncate(sample: ProcessedSample, length: int) -> ProcessedSample | None:
    """The first `length` tokens, cut before any image span that would not fit; None if nothing is left to train."""
    cut = length
    for start in sample.image_starts:
        if start < cut <= start + sample.span_length - 1:
            cut = start
    keep = [i for i, s in enumerate(sample.image_starts) if s < cut]
    labels, image_loss = sample.labels[:cut].copy(), sample.image_loss_mask[:cut].copy()
    labels[cut - 1], image_loss[cut - 1] = IGNORE, False
    if cut < 2 or (not (labels != IGNORE).any() and not image_loss.any()):
        return None
    return ProcessedSample(
        sample.input_ids[:cut],
        labels,
        image_loss,
        [sample.images[i] for i in keep],
        sample.image_starts[: len(keep)],
        sample.span_length,
    )


class Packer:
    """`add(key, sample)` returns a finished batch (a list of rows, each a list of (key, sample)) or None; raises
    `SkipSample` for an over-long sample that is dropped (the caller counts it like any other skip)."""

    def __init__(self, config: PackConfig):
        self.cfg = config
        self.rows: list[list[tuple]] = []
        self.used: list[int] = []
        self.counts: Counter = Counter()

    def pending_keys(self) -> list:
        return [key for row in self.rows for key, _ in row]

    def add(self, key, sample: ProcessedSample) -> list[list[tuple]] | None:
        if len(sample) > self.cfg.seq_len:
            if self.cfg.overlong == "drop":
                raise SkipSample("overlong_dropped", f"{len(sample)} tokens > seq_len={self.cfg.seq_len}")
            trimmed = truncate(sample, self.cfg.seq_len)
            if trimmed is None:
                raise SkipSample(
                    "overlong_no_target", f"nothing to train on in the first {self.cfg.seq_len} tokens"
                )
            self.counts["overlong_truncated"] += 1
            sample = trimmed
        if self.rows and self.used[-1] + len(sample) <= self.cfg.seq_len:
            self.rows[-1].append((key, sample))
            self.used[-1] += len(sample)
            return None
        batch = None
        if len(self.rows) == self.cfg.micro_batch_size:
            batch, self.rows, self.used = self.rows, [], []
        self.rows.append([(key, sample)])
        self.used.append(len(sample))
        return batch


def pixels_to_unit_range(pixels: torch.Tensor) -> torch.Tensor:
    """uint8 RGB [N, 3, H, W] -> float32 x / 127.5 - 1, in [-1, 1] (the tokenizer's input range)."""
    return pixels.float().div_(127.5).sub_(1.0)


def collate_rows(
    rows: list[list[tuple]],
    seq_len: int,
    pad_id: int,
    placeholder_id: int,
    image_size: tuple[int, int],
    float_images: bool = True,
) -> dict:
    """Rows of (key, ProcessedSample) -> the packed batch dict (see DESIGN / the project interfaces). With
    float_images=False the images stay uint8 [N, 3, H, W] (the loader converts them after the worker hand-over)."""
    batch_size = len(rows)
    input_ids = torch.full((batch_size, seq_len), pad_id, dtype=torch.long)
    labels = torch.full((batch_size, seq_len), IGNORE, dtype=torch.long)
    position_ids = torch.zeros((batch_size, seq_len), dtype=torch.long)
    segment_ids = torch.zeros((batch_size, seq_len), dtype=torch.long)
    image_loss_mask = torch.zeros((batch_size, seq_len), dtype=torch.bool)
    images, num_samples = [], 0
    for b, row in enumerate(rows):
        offset = 0
        for segment, (_, sample) in enumerate(row, start=1):
            n = len(sample)
            input_ids[b, offset : offset + n] = torch.from_numpy(sample.input_ids)
            labels[b, offset : offset + n] = torch.from_numpy(sample.labels)
            position_ids[b, offset : offset + n] = torch.arange(n)
            segment_ids[b, offset : offset + n] = segment
            image_loss_mask[b, offset : offset + n] = torch.from_numpy(sample.image_loss_mask)
            images.extend(sample.images)
            offset += n
            num_samples += 1
    if images:
        pixels = torch.from_numpy(np.stack(images))
    else:
        pixels = torch.zeros((0, 3, *image_size), dtype=torch.uint8)
    if float_images:
        pixels = pixels_to_unit_range(pixels)
    return {
        "input_ids": input_ids,
        "labels": labels,
        "position_ids": position_ids,
        "segment_ids": segment_ids,
        "images": pixels,
        "image_mask": input_ids == placeholder_id,
        "image_loss_mask": image_loss_mask,
        "num_samples": num_samples,
        "num_tokens": int((segment_ids > 0).sum()),
    }
