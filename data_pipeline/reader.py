"""Global sample order: weighted mixing of datasets, seeded shard-order + in-shard shuffling, epochs, rank layouts.

Every sample the loader reads has a *global position* `(epoch, p)`, `0 <= p < epoch_length`, fixed by the seed:

- **Mixture.** Weights become integer counts c_i per block of B = sum c_i positions; each block is a seeded
  permutation of its slots. Position p of epoch e is draw number k_i of dataset i, computed in closed form from the
  block index and the slots before p in its block (no re-iteration). An epoch is max_i ceil(n_i / c_i) blocks, so
  every dataset is seen at least once per epoch; a dataset whose weight exceeds its share of samples repeats.
- **Shuffle.** Draw k_i of dataset i is sample k_i mod n_i of pass k_i // n_i; each pass visits the shards in a seeded
  order and the rows of each shard in a seeded order (reads stay local to one memory-mapped shard).
- **Layout.** The positions of an epoch not consumed yet form the sequence R = leftover + [tail_start, epoch_length)
  (a fresh epoch has no leftover). Rank r reads R[r], R[r + W], R[r + 2W], ... and its dataloader workers take
  turns over that share, so the order a rank sees does not depend on the worker count. After a world-size change the
  positions that no old rank consumed become the new leftover: nothing is skipped or repeated (`relayout`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from data_pipeline.shards import ShardDataset


def mixture_counts(weights: list[float], resolution: int = 1000) -> list[int]:
    """Weights -> smallest integer slot counts per block with the same ratios (to 1/resolution)."""
    if not weights or any(not (w > 0 and math.isfinite(w)) for w in weights):
        raise ValueError(f"mixture weights must be positive finite numbers, got {weights}")
    total = sum(weights)
    counts = [max(1, round(resolution * w / total)) for w in weights]
    divisor = math.gcd(*counts)
    return [c // divisor for c in counts]


@dataclass
class Draw:
    """Where a global position lands: dataset, shard and row, and `draw` (the dataset's draw number, a stable
    per-sample key for per-sample randomness such as caption dropout)."""

    dataset: int
    shard: int
    row: int
    draw: int


class Mixture:
    """Global position (epoch, p) -> `Draw`, for several `ShardDataset`s mixed by weight."""

    def __init__(
        self, datasets: list[ShardDataset], weights: list[float] | None, seed: int, shuffle: bool = True
    ):
        if not datasets:
            raise ValueError("the loader needs at least one dataset")
        weights = list(weights) if weights is not None else [1.0] * len(datasets)
        if len(weights) != len(datasets):
            raise ValueError(f"got {len(weights)} mixture weights for {len(datasets)} datasets")
        self.datasets, self.seed, self.shuffle = datasets, seed, shuffle
        self.counts = mixture_counts(weights)
        self.block = sum(self.counts)
        self.blocks_per_epoch = max(math.ceil(d.num_samples / c) for d, c in zip(datasets, self.counts))
        self.epoch_length = self.blocks_per_epoch * self.block
        self._cache: dict[tuple, object] = {}

    def _cached(self, compute, *key):
        """Small memo for block slots and shuffle orders (cleared when it grows past 256 entries)."""
        key = (compute.__name__, *key)
        if key not in self._cache:
            if len(self._cache) >= 256:
                self._cache.clear()
            self._cache[key] = compute(*key[1:])
        return self._cache[key]

    def _compute_block_slots(self, block: int) -> tuple[np.ndarray, np.ndarray]:
        """(dataset of each slot, number of earlier slots of the same dataset) for one block."""
        slots = np.repeat(np.arange(len(self.counts)), self.counts)
        if self.shuffle and len(self.counts) > 1:
            slots = np.random.default_rng([self.seed, 1, block]).permutation(slots)
        before = np.zeros(len(slots), dtype=np.int64)
        seen = np.zeros(len(self.counts), dtype=np.int64)
        for j, d in enumerate(slots):
            before[j], seen[d] = seen[d], seen[d] + 1
        return slots, before

    def _compute_pass_order(self, dataset: int, pass_index: int) -> tuple[np.ndarray, np.ndarray]:
        """(shard visit order, cumulative row starts in that order) for one pass over a dataset."""
        rows = self.datasets[dataset].shard_rows
        order = np.arange(len(rows))
        if self.shuffle:
            order = np.random.default_rng([self.seed, 2, dataset, pass_index]).permutation(order)
        starts = np.concatenate([[0], np.cumsum(np.asarray(rows)[order])[:-1]])
        return order, starts

    def _compute_row_order(self, dataset: int, pass_index: int, shard: int) -> np.ndarray:
        n = self.datasets[dataset].shard_rows[shard]
        if not self.shuffle:
            return np.arange(n)
        return np.random.default_rng([self.seed, 3, dataset, pass_index, shard]).permutation(n)

    def locate(self, epoch: int, position: int) -> Draw:
        if not 0 <= position < self.epoch_length:
            raise IndexError(f"position {position} outside the epoch [0, {self.epoch_length})")
        block = epoch * self.blocks_per_epoch + position // self.block
        slots, before = self._cached(self._compute_block_slots, block)
        dataset = int(slots[position % self.block])
        draw = block * self.counts[dataset] + int(before[position % self.block])
        pass_index, k = divmod(draw, self.datasets[dataset].num_samples)
        order, starts = self._cached(self._compute_pass_order, dataset, pass_index)
        j = int(np.searchsorted(starts, k, side="right")) - 1
        shard = int(order[j])
        row = int(self._cached(self._compute_row_order, dataset, pass_index, shard)[k - int(starts[j])])
        return Draw(dataset, shard, row, draw)


@dataclass
class EpochLayout:
    """The not-yet-consumed positions of one epoch, in reading order: `leftover` then [tail_start, epoch_length)."""

    epoch_length: int
    leftover: list[int] = field(default_factory=list)
    tail_start: int = 0

    def __len__(self) -> int:
        return len(self.leftover) + self.epoch_length - self.tail_start

    def __getitem__(self, i: int) -> int:
        return self.leftover[i] if i < len(self.leftover) else self.tail_start + i - len(self.leftover)

    def share_length(self, rank: int, world_size: int) -> int:
        return max(0, math.ceil((len(self) - rank) / world_size))

    def to_dict(self) -> dict:
        return {"leftover": list(self.leftover), "tail_start": self.tail_start}

    @classmethod
    def from_dict(cls, epoch_length: int, d: dict) -> EpochLayout:
        return cls(epoch_length, [int(p) for p in d["leftover"]], int(d["tail_start"]))


def relayout(
    layout: EpochLayout, world_size: int, cursors: list[list[int]], pending: set[int]
) -> EpochLayout:
    """The positions of `layout` not consumed by `world_size` old ranks of S packing streams each (loader.py):
    share item k of rank r was received when k < cursors[r][k % S], and those in `pending` (packer buffers) were
    not yet trained on."""
    streams = len(cursors[0])
    low = min(min(c) for c in cursors) * world_size
    high = min(max(max(c) for c in cursors) * world_size, len(layout))
    index_of = {p: i for i, p in enumerate(layout.leftover)}
    pending_index = [index_of.get(p, len(layout.leftover) + p - layout.tail_start) for p in pending]
    leftover = [layout[i] for i in sorted(pending_index) if i < low]
    leftover += [
        layout[i]
        for i in range(low, high)
        if i // world_size >= cursors[i % world_size][i // world_size % streams] or layout[i] in pending
    ]
    if high < len(layout.leftover):
        leftover += layout.leftover[high:]
        tail = layout.tail_start
    else:
        tail = layout.tail_start + high - len(layout.leftover)
    return EpochLayout(layout.epoch_length, leftover, min(tail, layout.epoch_length))
