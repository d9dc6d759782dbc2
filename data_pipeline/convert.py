"""Convert image-text data to Arrow shards: `python -m data_pipeline.convert --format F --input ... --output DIR`.

Formats:
- `jsonl`: one object per line, `{"image": PATH, "text": CAPTION}` for a pair or `{"segments": [{"text": ...},
  {"image": PATH}, ...]}` for an interleaved sample; optional `id`, `task` and per-segment `role`. Paths are relative
  to the JSONL file.
- `webdataset`: tar shards; members `KEY.jpg|jpeg|png|webp` plus `KEY.txt` or `KEY.json` (`caption` or `text`).
- `llava`: a LLaVA conversation JSON (`[{"id", "image", "conversations": [{"from": "human"|"gpt", "value"}]}]`);
  images under `--image-root` (default: the JSON's folder); the `<image>` tag marks where the image goes.
- `parquet`: image-text tables; the image column holds bytes or `{"bytes", "path"}` structs (HF `Image` feature).

Image bytes are stored as given (never re-encoded), after a header check. Bad records are skipped and counted by
reason (missing_image_file, undecodable_image, empty_text, invalid_record); the first of each reason is logged with
its id, and a summary is printed at the end.
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import multiprocessing
import tarfile
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pyarrow.parquet as pq
from PIL import Image
from tqdm import tqdm

from data_pipeline.schema import TASKS, check_sample
from data_pipeline.shards import ShardWriter

log = logging.getLogger(__name__)
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp")


class SkipRecord(Exception):
    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail = reason, detail


def _check_image(data: bytes, where: str) -> bytes:
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.verify()
    except Exception as err:  # PIL raises many types for bad bytes
        raise SkipRecord("undecodable_image", f"{where}: {type(err).__name__}: {err}") from err
    return data


def _read_image(path: Path) -> bytes:
    if not path.is_file():
        raise SkipRecord("missing_image_file", f"{path} does not exist")
    return _check_image(path.read_bytes(), str(path))


def finish_record(record: dict) -> dict:
    """A raw record (images as `bytes` or `Path`) -> a checked sample; raises SkipRecord."""
    segments = []
    for seg in record["segments"]:
        if seg.get("image") is not None:
            image = seg["image"]
            data = _read_image(image) if isinstance(image, Path) else _check_image(image, record["id"])
            segments.append({"text": None, "image": data, "role": seg.get("role")})
        else:
            text = seg.get("text")
            if not isinstance(text, str) or not text.strip():
                raise SkipRecord("empty_text", f"{record['id']}: a text segment is empty or missing")
            segments.append({"text": text, "image": None, "role": seg.get("role")})
    sample = {"id": record["id"], "source": record["source"], "task": record["task"], "segments": segments}
    try:
        check_sample(sample)
    except ValueError as err:
        raise SkipRecord("invalid_record", str(err)) from err
    return sample


def _default_task(segments: list[dict]) -> str:
    if any(s.get("role") for s in segments):
        return "chat"
    images = sum(s.get("image") is not None for s in segments)
    return "text" if images == 0 else "caption" if images == 1 and len(segments) == 2 else "interleaved"


def read_jsonl(path: Path) -> Iterator[dict | SkipRecord]:
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            rid = f"{path.name}:{line_no}"
            try:
                obj = json.loads(line)
                rid = str(obj.get("id", rid))
                if "segments" in obj:
                    segments = [
                        {"image": path.parent / s["image"]} if "image" in s else {"text": s.get("text")}
                        for s in obj["segments"]
                    ]
                    for seg, raw in zip(segments, obj["segments"]):
                        seg["role"] = raw.get("role")
                else:
                    segments = [{"image": path.parent / obj["image"]}, {"text": obj.get("text")}]
            except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as err:
                yield SkipRecord("invalid_record", f"{rid}: {type(err).__name__}: {err}")
                continue
            task = obj.get("task") or _default_task(segments)
            if task not in TASKS:
                yield SkipRecord("invalid_record", f"{rid}: task {task!r} is not one of {TASKS}")
                continue
            yield {"id": rid, "source": path.name, "task": task, "segments": segments}


def read_webdataset(path: Path) -> Iterator[dict | SkipRecord]:
    with tarfile.open(path) as tar:
        groups: dict[str, dict] = {}
        for member in tar:
            if not member.isfile():
                continue
            key, _, ext = member.name.partition(".")
            groups.setdefault(key, {})["." + ext.lower()] = tar.extractfile(member).read()
    for key, files in groups.items():
        image = next((files[e] for e in IMAGE_EXTENSIONS if e in files), None)
        if image is None:
            yield SkipRecord("missing_image_file", f"{path.name}:{key}: no image member")
            continue
        text = files[".txt"].decode("utf-8") if ".txt" in files else None
        if text is None and ".json" in files:
            meta = json.loads(files[".json"])
            text = meta.get("caption") or meta.get("text")
        segments = [{"image": image}, {"text": text}]
        yield {"id": key, "source": path.name, "task": "caption", "segments": segments}


def read_llava(path: Path, image_root: Path | None) -> Iterator[dict | SkipRecord]:
    root = image_root or path.parent
    for index, entry in enumerate(json.loads(path.read_text())):
        rid = str(entry.get("id", index))
        segments = []
        for turn in entry.get("conversations", []):
            role = "user" if turn.get("from") in ("human", "user") else "assistant"
            value = str(turn.get("value", ""))
            if "<image>" in value and entry.get("image"):
                segments.append({"image": root / entry["image"], "role": "user"})
                value = value.replace("<image>", "").strip()
            segments.append({"text": value, "role": role})
        if not segments:
            yield SkipRecord("invalid_record", f"{rid}: no conversations")
            continue
        yield {"id": rid, "source": path.name, "task": "chat", "segments": segments}


def read_parquet(path: Path, image_column: str, text_column: str) -> Iterator[dict | SkipRecord]:
    table = pq.read_table(path)
    for column in (image_column, text_column):
        if column not in table.column_names:
            raise ValueError(
                f"{path}: no column {column!r} (columns: {table.column_names}); see --image-column/--text-column"
            )
    ids = table.column("id").to_pylist() if "id" in table.column_names else None
    for i, (image, text) in enumerate(
        zip(table.column(image_column).to_pylist(), table.column(text_column).to_pylist())
    ):
        rid = str(ids[i]) if ids else f"{path.name}:{i}"
        if isinstance(image, dict):
            image = image.get("bytes") or (Path(image["path"]) if image.get("path") else None)
        if image is None:
            yield SkipRecord("missing_image_file", f"{rid}: empty image cell")
            continue
        yield {
            "id": rid,
            "source": path.name,
            "task": "caption",
            "segments": [{"image": image}, {"text": text}],
        }


def _inputs(pattern: list[str]) -> list[Path]:
    paths = []
    for p in pattern:
        path = Path(p)
        matches = sorted(path.parent.glob(path.name)) if any(c in p for c in "*?[") else [path]
        for m in matches:
            if not m.is_file():
                raise FileNotFoundError(f"--input {m}: no such file")
            paths.append(m)
    if not paths:
        raise FileNotFoundError(f"--input {pattern}: matched no file")
    return paths


def _finish(record: dict | SkipRecord) -> dict | tuple[str, str]:
    """A sample, or (reason, detail) for a skip (tuples cross process boundaries safely)."""
    if isinstance(record, SkipRecord):
        return record.reason, record.detail
    try:
        return finish_record(record)
    except SkipRecord as err:
        return err.reason, err.detail


def convert(
    fmt: str,
    inputs: list[str],
    output: str,
    shard_size_mb: float = 256.0,
    workers: int = 1,
    image_root: str | None = None,
    image_column: str = "image",
    text_column: str = "text",
) -> tuple[int, Counter]:
    """Convert `inputs` to a dataset directory `output`; returns (samples written, skips by reason)."""
    readers = {
        "jsonl": read_jsonl,
        "webdataset": read_webdataset,
        "llava": lambda p: read_llava(p, Path(image_root) if image_root else None),
        "parquet": lambda p: read_parquet(p, image_column, text_column),
    }
    if fmt not in readers:
        raise ValueError(f"--format {fmt!r}: expected one of {sorted(readers)}")
    records = (r for path in _inputs(inputs) for r in readers[fmt](path))
    skips: Counter = Counter()
    written = 0
    pool = multiprocessing.Pool(workers) if workers > 1 else None
    results = pool.imap(_finish, records, chunksize=16) if pool else map(_finish, records)
    try:
        with ShardWriter(output, shard_size_mb=shard_size_mb, source=fmt) as writer:
            for result in tqdm(results, desc=f"convert {fmt}", unit=" samples"):
                if isinstance(result, tuple):
                    reason, detail = result
                    if not skips[reason]:
                        log.warning("skipped (%s): %s [further %r skips are counted]", reason, detail, reason)
                    skips[reason] += 1
                    continue
                writer.write(result)
                written += 1
    finally:
        if pool is not None:
            pool.close()
    return written, skips


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--format", required=True, choices=["jsonl", "webdataset", "llava", "parquet"])
    parser.add_argument("--input", required=True, nargs="+", help="input files (globs allowed)")
    parser.add_argument("--output", required=True, help="output dataset directory")
    parser.add_argument("--shard-size-mb", type=float, default=256.0)
    parser.add_argument("--workers", type=int, default=1, help="processes that read and check images")
    parser.add_argument(
        "--image-root", default=None, help="llava: the image folder (default: the JSON's folder)"
    )
    parser.add_argument("--image-column", default="image", help="parquet: the image column")
    parser.add_argument("--text-column", default="text", help="parquet: the caption column")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    written, skips = convert(
        args.format,
        args.input,
        args.output,
        args.shard_size_mb,
        args.workers,
        args.image_root,
        args.image_column,
        args.text_column,
    )
    total = written + sum(skips.values())
    print(f"wrote {written} samples to {args.output}; skipped {sum(skips.values())} of {total}")
    for reason, count in sorted(skips.items()):
        print(f"  {reason:<20} {count}")


if __name__ == "__main__":
    main()
