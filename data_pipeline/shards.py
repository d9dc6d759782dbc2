"""Shard files: Arrow IPC, written by `ShardWriter`, listed in a JSON manifest, read row by row by `ShardDataset`.

Why Arrow IPC (the *file* format, `.arrow`) and not Parquet: the reader needs random access to single rows in a
shuffled order (global sample positions, exact resume without re-reading). An Arrow IPC file is memory-mapped and a
row is a zero-copy slice of a record batch, so reading row i costs a page fault, not a decompress of a whole Parquet
row group (Parquet's ~128 MB row groups would have to be decoded to reach one row; its compression buys nothing on
JPEG/PNG bytes, which are already compressed). The files are still standard: `pyarrow.ipc.open_file` and
`datasets.load_dataset("arrow", data_files=...)` read them, and `pyarrow.parquet` tables convert in (`convert.py`).

Layout of a dataset directory::

    DIR/manifest.json        {"schema_version", "format", "num_samples", "shards": [{"path", "num_rows", "num_bytes"}],
                              "tasks": {task: count}, "source"}
    DIR/shard-00000.arrow    record batches of `SAMPLE_SCHEMA` rows
"""

from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path

import pyarrow as pa

from data_pipeline.schema import SAMPLE_SCHEMA, SCHEMA_VERSION, check_sample

MANIFEST = "manifest.json"
SHARD_FORMAT = "arrow_ipc_file"


class ShardWriter:
    """Append samples (dicts of `SAMPLE_SCHEMA`), rolling to a new shard every `shard_size_mb`; `close()` writes
    the manifest. Use as a context manager. Rows are buffered into record batches of `batch_rows` rows."""

    def __init__(
        self,
        out_dir: str | os.PathLike,
        shard_size_mb: float = 256.0,
        batch_rows: int = 256,
        source: str = "",
    ):
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        if (self.out_dir / MANIFEST).exists():
            raise FileExistsError(f"{self.out_dir / MANIFEST} exists: refusing to overwrite a dataset")
        self.shard_bytes, self.batch_rows, self.source = int(shard_size_mb * 2**20), batch_rows, source
        self.shards: list[dict] = []
        self.tasks: Counter = Counter()
        self._rows: list[dict] = []
        self._rows_bytes = 0
        self._writer = None
        self._file_rows = 0

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def write(self, sample: dict) -> None:
        check_sample(sample)
        self._rows.append(sample)
        self._rows_bytes += sum(
            len(s.get("image") or b"") + len(s.get("text") or "") for s in sample["segments"]
        )
        self.tasks[sample["task"]] += 1
        if len(self._rows) >= self.batch_rows or self._rows_bytes >= self.shard_bytes:
            self._flush()

    def _flush(self) -> None:
        if not self._rows:
            return
        if self._writer is None:
            path = self.out_dir / f"shard-{len(self.shards):05d}.arrow"
            self._sink = pa.OSFile(str(path), "wb")
            self._writer = pa.ipc.new_file(self._sink, SAMPLE_SCHEMA)
            self.shards.append({"path": path.name, "num_rows": 0, "num_bytes": 0})
        self._writer.write_batch(pa.RecordBatch.from_pylist(self._rows, schema=SAMPLE_SCHEMA))
        self.shards[-1]["num_rows"] += len(self._rows)
        self._rows, self._rows_bytes = [], 0
        if self._sink.tell() >= self.shard_bytes:
            self._close_shard()

    def _close_shard(self) -> None:
        self._writer.close()
        self._sink.close()
        self.shards[-1]["num_bytes"] = (self.out_dir / self.shards[-1]["path"]).stat().st_size
        self._writer = None

    def close(self) -> None:
        self._flush()
        if self._writer is not None:
            self._close_shard()
        manifest = {
            "schema_version": SCHEMA_VERSION,
            "format": SHARD_FORMAT,
            "num_samples": sum(s["num_rows"] for s in self.shards),
            "shards": self.shards,
            "tasks": dict(sorted(self.tasks.items())),
            "source": self.source,
        }
        tmp = self.out_dir / (MANIFEST + ".tmp")
        tmp.write_text(json.dumps(manifest, indent=1) + "\n")
        os.replace(tmp, self.out_dir / MANIFEST)


def read_manifest(dataset_dir: str | os.PathLike) -> dict:
    path = Path(dataset_dir) / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no manifest; is {dataset_dir} a dataset written by data_pipeline?")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON ({err})") from err
    if manifest.get("schema_version") != SCHEMA_VERSION or manifest.get("format") != SHARD_FORMAT:
        raise ValueError(
            f"{path}: schema_version={manifest.get('schema_version')!r} format={manifest.get('format')!r}, expected "
            f"{SCHEMA_VERSION} and {SHARD_FORMAT!r}"
        )
    return manifest


class CorruptShardError(Exception):
    """A shard file that cannot be opened or does not match its manifest entry."""


class ShardDataset:
    """Random access to the rows of one dataset directory. Shards are memory-mapped lazily on first access, so
    the object is cheap to pickle into DataLoader workers. `row(shard, index)` returns the sample dict."""

    def __init__(self, dataset_dir: str | os.PathLike):
        self.dir = Path(dataset_dir)
        self.manifest = read_manifest(self.dir)
        self.shard_rows = [int(s["num_rows"]) for s in self.manifest["shards"]]
        self.num_samples = sum(self.shard_rows)
        if self.num_samples == 0:
            raise ValueError(f"{self.dir / MANIFEST}: the dataset has no samples")
        self._open: dict[int, tuple] = {}

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_open": {}}

    def _shard(self, shard: int) -> tuple:
        if shard not in self._open:
            path = self.dir / self.manifest["shards"][shard]["path"]
            try:
                reader = pa.ipc.open_file(pa.memory_map(str(path), "r"))
                starts, total = [], 0
                for i in range(reader.num_record_batches):
                    starts.append(total)
                    total += reader.get_batch(i).num_rows
            except (OSError, pa.ArrowInvalid) as err:
                raise CorruptShardError(f"{path}: cannot read the Arrow file ({err})") from err
            if total != self.shard_rows[shard]:
                raise CorruptShardError(
                    f"{path}: has {total} rows, the manifest says {self.shard_rows[shard]}"
                )
            if reader.schema.remove_metadata() != SAMPLE_SCHEMA.remove_metadata():
                raise CorruptShardError(f"{path}: schema {reader.schema} is not the sample schema")
            self._open[shard] = (reader, starts)
        return self._open[shard]

    def row(self, shard: int, index: int) -> dict:
        if not 0 <= shard < len(self.shard_rows) or not 0 <= index < self.shard_rows[shard]:
            raise IndexError(
                f"{self.dir}: no row ({shard}, {index}); the dataset has {len(self.shard_rows)} shards of "
                f"{self.shard_rows} rows"
            )
        reader, starts = self._shard(shard)
        lo, hi = 0, len(starts) - 1
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if starts[mid] <= index:
                lo = mid
            else:
                hi = mid - 1
        try:
            return reader.get_batch(lo).slice(index - starts[lo], 1).to_pylist()[0]
        except (OSError, pa.ArrowInvalid) as err:
            raise CorruptShardError(f"{self.dir}: shard {shard} row {index}: {err}") from err
