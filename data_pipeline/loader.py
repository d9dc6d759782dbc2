"""The training loader: global sample order -> packing streams (read, decode, tokenise, pack, collate) -> batches.

    loader = build_train_loader(LoaderConfig(datasets=[...], rank=r, world_size=w, ...), tokenizer)
    for batch in loader: ...                     # infinite; epochs roll over
    state = loader.state_dict()                  # collective when torch.distributed is initialised (all ranks)
    loader.load_state_dict(state)                # same state on every rank; before iterating

**Packing streams.** A rank's share of the global order (reader.py) is split into `pack_streams` = S streams: stream
s takes share items s, s + S, s + 2S, ... of every epoch and packs them with its own packer. Batches come out
round-robin over the streams (stream 0's first batch, stream 1's first, ..., stream 0's second, ...), so the
batch sequence is a function of the seed, the world size and S alone. DataLoader worker w of N (N divides S)
builds the batches of streams w, w + N, ...: reading, decoding, tokenising, packing and collation all run in the
workers, and whole batches come back, each with its stream's state after it. With `num_workers=0` the same streams
run in the main process. `pack_streams=None` (the default) takes max(1, num_workers) on a fresh start and the saved
S on a resume; a configured worker count that does not divide S uses the largest divisor of S below it.

**State** (JSON-serialisable, global): seed, datasets and weights, world size, S, per-epoch layouts of the positions
not yet consumed (reader.py), and per rank the stream to emit next and per stream its epoch, cursor (the next share
index it reads) and packer pending keys. With the same world size and S the stream continues exactly, for any
number of workers. With another world size or S the unconsumed positions, pending ones included, are laid out
again, so no sample of the epoch is skipped or repeated. Nothing consumed is re-read.

Bad samples (undecodable image, empty text, corrupt shard, schema violation) are skipped, counted by reason and
logged once per reason with the sample id; a skip rate above `max_skip_fraction` (after `min_samples_for_skip_check`
samples) stops the run with `DataSkipRateError`.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from typing import Literal

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from data_pipeline.packing import PackConfig, Packer, collate_rows, pixels_to_unit_range
from data_pipeline.processing import ProcessConfig, SampleProcessor, SkipSample
from data_pipeline.reader import EpochLayout, Mixture, relayout
from data_pipeline.schema import check_sample
from data_pipeline.shards import CorruptShardError, ShardDataset
from data_pipeline.text_tokenizer import TextTokenizer

log = logging.getLogger(__name__)
STATE_VERSION = 2


class DataSkipRateError(RuntimeError):
    """Too many samples were skipped as bad input."""


@dataclass
class LoaderConfig:
    datasets: list[str] = field(default_factory=list)
    weights: list[float] | None = None
    rank: int = 0
    world_size: int = 1
    num_workers: int = 0
    pack_streams: int | None = None
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
    prefetch_factor: int = 2
    pin_memory: bool = False


@dataclass
class StreamState:
    """Where one packing stream stands: it reads share index `cursor` of `epoch` next; `pending` holds the
    (epoch, position) keys in its packer."""

    epoch: int
    cursor: int
    pending: list = field(default_factory=list)


@dataclass
class _Skip:
    sample_id: str
    reason: str
    detail: str


@dataclass
class _Item:
    """One share item read and processed: its global key, and the sample or why it was skipped."""

    key: tuple[int, int]
    sample_id: str
    sample: object = None
    skip: _Skip | None = None


@dataclass
class _Batch:
    """A collated batch as it leaves a stream, with what the main process needs to account for it; a stream whose
    own skip rate is too high sends its skips and the error instead (the main process counts them, then raises)."""

    stream: int
    batch: dict
    keys: list
    state: StreamState
    received: int
    skips: list[_Skip]
    packer_counts: Counter
    error: DataSkipRateError | None = None


WIRE_ROWS = ("input_ids", "labels", "position_ids", "segment_ids", "image_loss_mask")


def to_wire(batch: dict) -> dict:
    """A collated batch (packing.collate_rows with uint8 images) as numpy arrays: its [B, S] tensors stacked into
    one int64 array [5, B, S], and the uint8 images. A DataLoader worker hands each tensor over through shared
    memory, one file-descriptor round trip per storage (about 1 ms each on a 2-core CPU); numpy arrays travel
    pickled in the queue's pipe instead, and uint8 images are a quarter of the float bytes."""
    wire = {k: v for k, v in batch.items() if k not in WIRE_ROWS and k != "image_mask"}
    wire["rows"] = torch.stack([batch[k].long() for k in WIRE_ROWS]).numpy()
    wire["images"] = batch["images"].numpy()
    return wire


def from_wire(wire: dict, placeholder_id: int) -> dict:
    """The collated batch back from `to_wire`, keys in collate_rows's order, images as float in [-1, 1]: values
    bitwise those of collate_rows(..., float_images=True)."""
    rows = dict(zip(WIRE_ROWS, torch.from_numpy(wire["rows"]).unbind(0)))
    rows["image_loss_mask"] = rows["image_loss_mask"].bool()
    rest = {k: v for k, v in wire.items() if k != "rows"}
    return {
        **{k: rows[k] for k in WIRE_ROWS[:4]},
        "images": pixels_to_unit_range(torch.from_numpy(rest.pop("images"))),
        "image_mask": rows["input_ids"] == placeholder_id,
        "image_loss_mask": rows["image_loss_mask"],
        **rest,
    }


def skip_rate_error(
    received: int, skips: Counter, last: _Skip, cfg: LoaderConfig
) -> DataSkipRateError | None:
    """The error to stop with when more than cfg.max_skip_fraction of `received` samples were skipped."""
    skipped = sum(skips.values())
    if received < cfg.min_samples_for_skip_check or skipped <= cfg.max_skip_fraction * received:
        return None
    return DataSkipRateError(
        f"{skipped} of {received} samples skipped ({skipped / received:.1%}) on rank {cfg.rank}, above "
        f"max_skip_fraction={cfg.max_skip_fraction}; by reason: {dict(skips)}; last: {last.sample_id} "
        f"({last.reason}: {last.detail})"
    )


class _BatchStreams(IterableDataset):
    """This rank's packing streams from their saved states on, as batches; in DataLoader workers or in-process."""

    def __init__(
        self,
        mixture: Mixture,
        processor: SampleProcessor,
        cfg: LoaderConfig,
        pad_id: int,
        placeholder_id: int,
    ):
        self.mixture, self.processor, self.cfg = mixture, processor, cfg
        self.pad_id, self.placeholder_id = pad_id, placeholder_id
        self.pack_config = PackConfig(cfg.seq_len, cfg.micro_batch_size, cfg.overlong)
        self.layouts: dict[int, EpochLayout] = {}
        self.streams: list[StreamState] = []
        self.first = 0

    def layout(self, epoch: int) -> EpochLayout:
        return self.layouts[epoch] if epoch in self.layouts else EpochLayout(self.mixture.epoch_length)

    def fetch(self, epoch: int, position: int) -> _Item:
        draw = self.mixture.locate(epoch, position)
        dataset = self.mixture.datasets[draw.dataset]
        item = _Item((epoch, position), f"{dataset.dir.name}/shard{draw.shard}/row{draw.row}")
        try:
            row = dataset.row(draw.shard, draw.row)
            item.sample_id = f"{dataset.dir.name}/{row['id']}"
            check_sample(row)
            item.sample = self.processor(row, (draw.dataset, draw.draw))
        except CorruptShardError as err:
            item.skip = _Skip(item.sample_id, "corrupt_shard", str(err))
        except ValueError as err:
            item.skip = _Skip(item.sample_id, "invalid_sample", str(err))
        except SkipSample as err:
            item.skip = _Skip(item.sample_id, err.reason, err.detail)
        return item

    def restore_packer(self, state: StreamState) -> Packer:
        """A packer holding the stream's pending samples, read again (packing.py: the buffer is a function of them)."""
        packer = Packer(self.pack_config)
        for epoch, position in state.pending:
            item = self.fetch(epoch, position)
            if item.skip is not None:
                raise ValueError(
                    f"pending sample {item.sample_id} of the saved data state cannot be read again: {item.skip.detail}"
                )
            packer.add((epoch, position), item.sample)
        return packer

    def batches(self, stream: int) -> Iterator[_Batch]:
        """Stream `stream`'s batches: share items cursor, cursor + S, ... of each epoch, packed and collated."""
        cfg, count = self.cfg, len(self.streams)
        state = self.streams[stream]
        packer = self.restore_packer(state)
        counted = Counter(packer.counts)
        epoch, index = state.epoch, state.cursor
        received, skips, total_received, total_skips = 0, [], 0, Counter()
        while True:
            layout = self.layout(epoch)
            share = layout.share_length(cfg.rank, cfg.world_size)
            while index < share:
                item = self.fetch(epoch, layout[cfg.rank + index * cfg.world_size])
                index, received, total_received = index + count, received + 1, total_received + 1
                if item.skip is None:
                    try:
                        rows = packer.add(item.key, item.sample)
                    except SkipSample as err:
                        item.skip = _Skip(item.sample_id, err.reason, err.detail)
                if item.skip is not None:
                    skips.append(item.skip)
                    total_skips[item.skip.reason] += 1
                    error = skip_rate_error(total_received, total_skips, item.skip, cfg)
                    if error is not None:
                        after = StreamState(epoch, index, [list(k) for k in packer.pending_keys()])
                        yield _Batch(stream, {}, [], after, received, skips, packer.counts - counted, error)
                        return
                    continue
                if rows is not None:
                    batch = to_wire(
                        collate_rows(
                            rows,
                            cfg.seq_len,
                            self.pad_id,
                            self.placeholder_id,
                            cfg.image_size,
                            float_images=False,
                        )
                    )
                    after = StreamState(epoch, index, [list(k) for k in packer.pending_keys()])
                    keys = [key for row in rows for key, _ in row]
                    yield _Batch(stream, batch, keys, after, received, skips, packer.counts - counted)
                    received, skips, counted = 0, [], Counter(packer.counts)
            epoch, index = epoch + 1, stream

    def __iter__(self) -> Iterator[_Batch]:
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        count = len(self.streams)
        mine = [
            self.batches((self.first + worker + t * num_workers) % count) for t in range(count // num_workers)
        ]
        while True:
            for batches in mine:
                yield next(batches)


def _identity(item):
    return item


def _divisor_at_most(n: int, limit: int) -> int:
    return max(d for d in range(1, min(n, limit) + 1) if n % d == 0)


class StreamingLoader:
    """Iterates packed batches forever; see the module docstring for the state contract."""

    def __init__(self, config: LoaderConfig, tokenizer: TextTokenizer):
        if not 0 <= config.rank < config.world_size:
            raise ValueError(f"rank={config.rank} must be in [0, world_size={config.world_size})")
        if config.num_workers < 0:
            raise ValueError(f"num_workers={config.num_workers} must be >= 0")
        if config.pack_streams is not None and config.pack_streams < 1:
            raise ValueError(f"pack_streams={config.pack_streams} must be >= 1 (or None: one per worker)")
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
        self.source = _BatchStreams(
            self.mixture,
            SampleProcessor(tokenizer, process),
            config,
            tokenizer.pad_id,
            tokenizer.image_placeholder_id,
        )
        self._start_streams(config.pack_streams or max(1, config.num_workers))
        self.received, self.skips, self.packer_counts = 0, Counter(), Counter()
        self.last_batch_keys: list[tuple[int, int]] = []
        self._iterator = None

    def _start_streams(self, count: int, epoch: int = 0) -> None:
        self.source.streams = [StreamState(epoch, s) for s in range(count)]
        self.source.first = 0

    @property
    def streams(self) -> list[StreamState]:
        return self.source.streams

    @property
    def epoch(self) -> int:
        """The oldest epoch some stream still reads."""
        return min(s.epoch for s in self.streams)

    def pending_keys(self) -> list[tuple[int, int]]:
        return [tuple(k) for s in self.streams for k in s.pending]

    def _batches(self) -> Iterator[_Batch]:
        workers = _divisor_at_most(len(self.streams), self.cfg.num_workers) if self.cfg.num_workers else 0
        if workers == 0:
            return iter(self.source)
        if workers < self.cfg.num_workers:
            log.info(
                "data: %d of num_workers=%d build batches (they must divide the %d packing streams)",
                workers,
                self.cfg.num_workers,
                len(self.streams),
            )
        loader = DataLoader(
            self.source,
            batch_size=None,
            num_workers=workers,
            collate_fn=_identity,
            prefetch_factor=self.cfg.prefetch_factor,
        )
        return iter(loader)

    def __iter__(self) -> Iterator[dict]:
        return self

    def __next__(self) -> dict:
        if self._iterator is None:
            self._iterator = self._batches()
        out = next(self._iterator)
        self.streams[out.stream] = out.state
        self.source.first = (out.stream + 1) % len(self.streams)
        self.received += out.received
        self.packer_counts.update(out.packer_counts)
        for skip in out.skips:
            self._count_skip(skip)
        if out.error is not None:
            raise out.error
        self.last_batch_keys = out.keys
        batch = from_wire(out.batch, self.tokenizer.image_placeholder_id)
        if self.cfg.pin_memory:
            return {k: v.pin_memory() if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
        return batch

    def _count_skip(self, skip: _Skip) -> None:
        if self.skips[skip.reason] == 0:
            log.warning(
                "skipping sample %s (%s): %s [further %r skips are counted]",
                skip.sample_id,
                skip.reason,
                skip.detail,
                skip.reason,
            )
        self.skips[skip.reason] += 1
        error = skip_rate_error(self.received, self.skips, skip, self.cfg)
        if error is not None:
            raise error

    @property
    def stats(self) -> dict:
        """Counters for logging: samples received, skipped by reason, overlong samples truncated/dropped."""
        return {"received": self.received, "skipped": dict(self.skips), **dict(self.packer_counts)}

    def local_state(self) -> dict:
        """This rank's part of the state (combine all ranks' with `merge_states`)."""
        return {
            "rank": self.cfg.rank,
            "streams": [asdict(s) for s in self.streams],
            "next_stream": self.source.first,
            "received": self.received,
            "skipped": dict(self.skips),
            "layouts": {
                str(e): lay.to_dict() for e, lay in self.source.layouts.items() if e >= self._min_epoch()
            },
        }

    def _min_epoch(self) -> int:
        return min([self.epoch] + [e for e, _ in self.pending_keys()])

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
            "pack_streams": len(self.streams),
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
        count = self.cfg.pack_streams or state["pack_streams"]
        if state["world_size"] == self.cfg.world_size and count == state["pack_streams"]:
            mine = ranks[self.cfg.rank]
            self.source.streams = [StreamState(**s) for s in mine["streams"]]
            self.source.first = mine["next_stream"]
            self.received, self.skips = mine["received"], Counter(mine["skipped"])
        else:
            layouts = _relayout_all(layouts, ranks, state["world_size"], length)
            pending_epochs = [k[0] for r in ranks for s in r["streams"] for k in s["pending"]]
            self._start_streams(
                count, min([s["epoch"] for r in ranks for s in r["streams"]] + pending_epochs)
            )
            self.received, self.skips = 0, Counter()
        self.source.layouts = layouts
        self.packer_counts, self._iterator = Counter(), None
        for stream in self.streams:
            self.source.restore_packer(stream)


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
    ranks = [{k: p[k] for k in ("streams", "next_stream", "received", "skipped")} for p in parts]
    consumed = sum(p["received"] - sum(len(s["pending"]) for s in p["streams"]) for p in parts)
    return {
        **header,
        "layouts": layouts,
        "ranks": ranks,
        "samples_consumed": consumed,
        "skipped": dict(skipped),
    }


def _relayout_all(layouts: dict[int, EpochLayout], ranks: list[dict], world_size: int, length: int) -> dict:
    """New layouts for every epoch some old stream had started: the positions no stream consumed, pending included."""
    streams = [s for r in ranks for s in r["streams"]]
    first = min([s["epoch"] for s in streams] + [k[0] for s in streams for k in s["pending"]])
    last = max(s["epoch"] for s in streams)
    new = {}
    for epoch in range(first, last + 1):
        layout = layouts[epoch] if epoch in layouts else EpochLayout(length)
        cursors = []
        for rank, r in enumerate(ranks):
            share = layout.share_length(rank, world_size)
            cursors.append(
                [
                    share if s["epoch"] > epoch else s["cursor"] if s["epoch"] == epoch else 0
                    for s in r["streams"]
                ]
            )
        pending = {pos for s in streams for e, pos in s["pending"] if e == epoch}
        new[epoch] = relayout(layout, world_size, cursors, pending)
    return new


def build_train_loader(config: LoaderConfig, tokenizer: TextTokenizer) -> StreamingLoader:
    return StreamingLoader(config, tokenizer)
