"""The training loader: global sample order -> workers (read, decode, tokenise) -> packer -> packed batches.

    loader = build_train_loader(LoaderConfig(datasets=[...], rank=r, world_size=w, ...), tokenizer)
    for batch in loader: ...                     # infinite; epochs roll over
    state = loader.state_dict()                  # collective when torch.distributed is initialised (all ranks)
    loader.load_state_dict(state)                # same state on every rank; before iterating

State (JSON-serialisable, global): seed, datasets and weights, world size, per-epoch layouts of the positions not yet
consumed (reader.py), and per rank its epoch, cursor (share items received) and packer pending keys. With the same
world size the stream continues exactly (any worker count: worker k takes share items k, k+N, ..., and the
DataLoader returns them round-robin, i.e. in share order). With another world size the unconsumed positions, pending
ones included, are laid out again, so no sample of the epoch is skipped or repeated. Nothing consumed is re-read.

Bad samples (undecodable image, empty text, corrupt shard, schema violation) are skipped, counted by reason and
logged once per reason with the sample id; a skip rate above `max_skip_fraction` (after `min_samples_for_skip_check`
samples) stops the run with `DataSkipRateError`.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from data_pipeline.packing import PackConfig, Packer, collate_rows
from data_pipeline.processing import ProcessConfig, SampleProcessor, SkipSample
from data_pipeline.reader import EpochLayout, Mixture, relayout
from data_pipeline.schema import check_sample
from data_pipeline.shards import CorruptShardError, ShardDataset
from data_pipeline.text_tokenizer import TextTokenizer

log = logging.getLogger(__name__)
STATE_VERSION = 1


class DataSkipRateError(RuntimeError):
    """Too many samples were skipped as bad input."""


@dataclass
class LoaderConfig:
    datasets: list[str] = field(default_factory=list)
    weights: list[float] | None = None
    rank: int = 0
    world_size: int = 1
    num_workers: int = 0
    seed: int = 0
    shuffle: bool = True
    image_size: tuple[int, int] = (32, 32)
    downsample: int = 8
    resize: Literal["center_crop", "stretch"] = "center_crop"
    seq_len: int = 128
    micro_batch_size: int = 4
    overlong: Literal["truncate", "drop"] = "truncate"
    caption_dropout: float = 0.0
    max_skip_fraction: float = 0.05
    min_samples_for_skip_check: int = 200
    prefetch_factor: int = 8
    pin_memory: bool = False


@dataclass
class _Item:
    """One share item as it leaves a worker: its place in the stream, and the sample or the reason it was skipped."""

    epoch: int
    index: int
    position: int
    sample_id: str
    sample: object = None
    skip: str | None = None
    detail: str = ""


class _ShareStream(IterableDataset):
    """This rank's share of the global order from (epoch, cursor) on, read and processed in DataLoader workers."""

    def __init__(self, mixture: Mixture, processor: SampleProcessor, rank: int, world_size: int):
        self.mixture, self.processor, self.rank, self.world_size = mixture, processor, rank, world_size
        self.layouts: dict[int, EpochLayout] = {}
        self.start_epoch, self.start_index = 0, 0

    def layout(self, epoch: int) -> EpochLayout:
        return self.layouts[epoch] if epoch in self.layouts else EpochLayout(self.mixture.epoch_length)

    def fetch(self, epoch: int, index: int, position: int) -> _Item:
        draw = self.mixture.locate(epoch, position)
        dataset = self.mixture.datasets[draw.dataset]
        item = _Item(epoch, index, position, f"{dataset.dir.name}/shard{draw.shard}/row{draw.row}")
        try:
            row = dataset.row(draw.shard, draw.row)
            item.sample_id = f"{dataset.dir.name}/{row['id']}"
            check_sample(row)
            item.sample = self.processor(row, (draw.dataset, draw.draw))
        except CorruptShardError as err:
            item.skip, item.detail = "corrupt_shard", str(err)
        except ValueError as err:
            item.skip, item.detail = "invalid_sample", str(err)
        except SkipSample as err:
            item.skip, item.detail = err.reason, err.detail
        return item

    def __iter__(self) -> Iterator[_Item]:
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        epoch, index, k = self.start_epoch, self.start_index, 0
        while True:
            layout = self.layout(epoch)
            share = layout.share_length(self.rank, self.world_size)
            while index < share:
                if k % num_workers == worker:
                    yield self.fetch(epoch, index, layout[self.rank + index * self.world_size])
                index, k = index + 1, k + 1
            epoch, index = epoch + 1, 0


def _identity(item):
    return item


class StreamingLoader:
    """Iterates packed batches forever; see the module docstring for the state contract."""

    def __init__(self, config: LoaderConfig, tokenizer: TextTokenizer):
        if not 0 <= config.rank < config.world_size:
            raise ValueError(f"rank={config.rank} must be in [0, world_size={config.world_size})")
        if config.num_workers < 0:
            raise ValueError(f"num_workers={config.num_workers} must be >= 0")
        self.cfg, self.tokenizer = config, tokenizer
        self.datasets = [ShardDataset(path) for path in config.datasets]
        self.mixture = Mixture(self.datasets, config.weights, config.seed, config.shuffle)
        if self.mixture.epoch_length < config.world_size:
            raise ValueError(
                f"an epoch has {self.mixture.epoch_length} samples, fewer than world_size={config.world_size}"
            )
        process = ProcessConfig(
            config.image_size, config.downsample, config.resize, config.caption_dropout, config.seed
        )
        self.stream = _ShareStream(
            self.mixture, SampleProcessor(tokenizer, process), config.rank, config.world_size
        )
        self.pack_config = PackConfig(config.seq_len, config.micro_batch_size, config.overlong)
        self.packer = Packer(self.pack_config)
        self.epoch, self.cursor = 0, 0
        self.received, self.skips = 0, Counter()
        self.last_batch_keys: list[tuple[int, int]] = []
        self._iterator = None

    def _items(self) -> Iterator[_Item]:
        self.stream.start_epoch, self.stream.start_index = self.epoch, self.cursor
        if self.cfg.num_workers == 0:
            return iter(self.stream)
        loader = DataLoader(
            self.stream,
            batch_size=None,
            num_workers=self.cfg.num_workers,
            collate_fn=_identity,
            prefetch_factor=self.cfg.prefetch_factor,
        )
        return iter(loader)

    def __iter__(self) -> Iterator[dict]:
        return self

    def __next__(self) -> dict:
        if self._iterator is None:
            self._iterator = self._items()
        while True:
            item = next(self._iterator)
            self.epoch, self.cursor = item.epoch, item.index + 1
            self.received += 1
            if item.skip is not None:
                self._count_skip(item)
                continue
            try:
                rows = self.packer.add((item.epoch, item.position), item.sample)
            except SkipSample as err:
                item.skip, item.detail = err.reason, err.detail
                self._count_skip(item)
                continue
            if rows is not None:
                self.last_batch_keys = [key for row in rows for key, _ in row]
                batch = collate_rows(
                    rows,
                    self.cfg.seq_len,
                    self.tokenizer.pad_id,
                    self.tokenizer.image_placeholder_id,
                    self.cfg.image_size,
                )
                if self.cfg.pin_memory:
                    batch = {
                        k: v.pin_memory() if isinstance(v, torch.Tensor) else v for k, v in batch.items()
                    }
                return batch

    def _count_skip(self, item: _Item) -> None:
        if self.skips[item.skip] == 0:
            log.warning(
                "skipping sample %s (%s): %s [further %r skips are counted]",
                item.sample_id,
                item.skip,
                item.detail,
                item.skip,
            )
        self.skips[item.skip] += 1
        skipped = sum(self.skips.values())
        if (
            self.received >= self.cfg.min_samples_for_skip_check
            and skipped > self.cfg.max_skip_fraction * self.received
        ):
            raise DataSkipRateError(
                f"{skipped} of {self.received} samples skipped ({skipped / self.received:.1%}) on rank {self.cfg.rank}, "
                f"above max_skip_fraction={self.cfg.max_skip_fraction}; by reason: {dict(self.skips)}; last: "
                f"{item.sample_id} ({item.skip}: {item.detail})"
            )

    @property
    def stats(self) -> dict:
        """Counters for logging: samples received, skipped by reason, overlong samples truncated/dropped."""
        return {"received": self.received, "skipped": dict(self.skips), **dict(self.packer.counts)}

    def local_state(self) -> dict:
        """This rank's part of the state (combine all ranks' with `merge_states`)."""
        return {
            "rank": self.cfg.rank,
            "epoch": self.epoch,
            "cursor": self.cursor,
            "pending": [list(key) for key in self.packer.pending_keys()],
            "received": self.received,
            "skipped": dict(self.skips),
            "layouts": {
                str(e): lay.to_dict() for e, lay in self.stream.layouts.items() if e >= self._min_epoch()
            },
        }

    def _min_epoch(self) -> int:
        return min([self.epoch] + [e for e, _ in self.packer.pending_keys()])

    def state_dict(self) -> dict:
        """The global state. Under torch.distributed this gathers every rank's part: call it on all ranks."""
        parts = [self.local_state()]
        if (
            torch.distributed.is_available()
            and torch.distributed.is_initialized()
            and self.cfg.world_size > 1
        ):
            parts = [None] * torch.distributed.get_world_size()
            torch.distributed.all_gather_object(parts, self.local_state())
        return merge_states(parts, self._header())

    def _header(self) -> dict:
        return {
            "version": STATE_VERSION,
            "seed": self.cfg.seed,
            "datasets": [str(p) for p in self.cfg.datasets],
            "weights": self.mixture.counts,
            "epoch_length": self.mixture.epoch_length,
            "world_size": self.cfg.world_size,
        }

    def load_state_dict(self, state: dict) -> None:
        header = self._header()
        for key in ("version", "seed", "datasets", "weights", "epoch_length"):
            if state.get(key) != header[key]:
                raise ValueError(
                    f"data loader state: {key}={state.get(key)!r} but this loader has {header[key]!r}; the sample order "
                    "depends on it, so the state cannot be resumed"
                )
        length = self.mixture.epoch_length
        layouts = {int(e): EpochLayout.from_dict(length, d) for e, d in state["layouts"].items()}
        ranks = state["ranks"]
        if state["world_size"] == self.cfg.world_size:
            mine = ranks[self.cfg.rank]
            epoch, cursor, pending = mine["epoch"], mine["cursor"], [tuple(k) for k in mine["pending"]]
            self.received, self.skips = mine["received"], Counter(mine["skipped"])
        else:
            layouts = _relayout_all(layouts, ranks, state["world_size"], length)
            epoch, cursor, pending = min(r["epoch"] for r in ranks), 0, []
            epoch = min([epoch] + [k[0] for r in ranks for k in r["pending"]])
            self.received, self.skips = 0, Counter()
        self.stream.layouts = layouts
        self.epoch, self.cursor, self._iterator = epoch, cursor, None
        self.packer = Packer(self.pack_config)
        for e, position in pending:
            item = self.stream.fetch(e, -1, position)
            if item.skip is not None:
                raise ValueError(
                    f"pending sample {item.sample_id} of the saved state cannot be read again: {item.detail}"
                )
            self.packer.add((e, position), item.sample)


def merge_states(parts: list[dict], header: dict) -> dict:
    """Combine the `local_state()` of every rank into the global state."""
    parts = sorted(parts, key=lambda p: p["rank"])
    if [p["rank"] for p in parts] != list(range(header["world_size"])):
        raise ValueError(
            f"expected the states of ranks 0..{header['world_size'] - 1}, got {[p['rank'] for p in parts]}"
        )
    layouts: dict = {}
    for p in parts:
        layouts.update(p["layouts"])
    skipped: Counter = Counter()
    for p in parts:
        skipped.update(p["skipped"])
    ranks = [{k: p[k] for k in ("epoch", "cursor", "pending", "received", "skipped")} for p in parts]
    consumed = sum(p["received"] - len(p["pending"]) for p in parts)
    return {
        **header,
        "layouts": layouts,
        "ranks": ranks,
        "samples_consumed": consumed,
        "skipped": dict(skipped),
    }


def _relayout_all(layouts: dict[int, EpochLayout], ranks: list[dict], world_size: int, length: int) -> dict:
    """New layouts for every epoch some old rank had started: the positions no rank consumed, pending included."""
    first = min([r["epoch"] for r in ranks] + [k[0] for r in ranks for k in r["pending"]])
    last = max(r["epoch"] for r in ranks)
    new = {}
    for epoch in range(first, last + 1):
        layout = layouts[epoch] if epoch in layouts else EpochLayout(length)
        cursors = []
        for rank, r in enumerate(ranks):
            if r["epoch"] > epoch:
                cursors.append(layout.share_length(rank, world_size))
            else:
                cursors.append(r["cursor"] if r["epoch"] == epoch else 0)
        pending = {pos for r in ranks for e, pos in r["pending"] if e == epoch}
        new[epoch] = relayout(layout, world_size, cursors, pending)
    return new


def build_train_loader(config: LoaderConfig, tokenizer: TextTokenizer) -> StreamingLoader:
    return StreamingLoader(config, tokenizer)
