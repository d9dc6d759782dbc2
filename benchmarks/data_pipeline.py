"""Data pipeline throughput: read, decode+resize, process, pack, and the whole loader, per worker core.

    python -m benchmarks.data_pipeline [--samples 600] [--out benchmarks/results/data_pipeline.json]

Source images are ImageNet-like 500x375 JPEGs (quality 90, smooth content plus noise, ~40-70 KB) for the 256-px
target and 1000x750 JPEGs for the 512-px target. Every stage runs in one process on one core (OMP_NUM_THREADS=1),
and samples/s is per CPU-second of that process (time.process_time), i.e. per worker core even on a shared
machine; the loader rows are wall-clock with 0 and 2 DataLoader workers. The last column compares the
loader with a training step's consumption (`--step-seconds`, `--step-samples`): >= 2x is the target.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from data_pipeline.loader import LoaderConfig, build_train_loader
from data_pipeline.packing import PackConfig, Packer, collate_rows
from data_pipeline.processing import ProcessConfig, SampleProcessor, decode_image
from data_pipeline.shards import ShardDataset, ShardWriter
from data_pipeline.synthetic import text_samples
from data_pipeline.text_tokenizer import train_sentencepiece


def natural_jpeg(rng: np.random.Generator, width: int, height: int) -> bytes:
    coarse = Image.fromarray(rng.integers(0, 255, (12, 16, 3), dtype=np.uint8)).resize(
        (width, height), Image.BICUBIC
    )
    pixels = np.asarray(coarse, dtype=np.float32) + rng.normal(0, 8, (height, width, 3))
    buf = io.BytesIO()
    Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def write_dataset(path: Path, n: int, width: int, height: int, seed: int) -> int:
    rng = np.random.default_rng(seed)
    captions = [s["segments"][0]["text"] for s in text_samples(rng, n, "c")]
    total = 0
    with ShardWriter(path, shard_size_mb=64) as writer:
        for i in range(n):
            image = natural_jpeg(rng, width, height)
            total += len(image)
            segments = [
                {"text": None, "image": image, "role": None},
                {"text": captions[i], "image": None, "role": None},
            ]
            writer.write({"id": f"s{i}", "source": "bench", "task": "caption", "segments": segments})
    return total


def rate(fn, items) -> float:
    """Samples per CPU-second of this process: a per-core rate that other load on the machine does not dilute."""
    start = time.process_time()
    for item in items:
        fn(item)
    return len(items) / (time.process_time() - start)


def bench_resolution(root: Path, tokenizer, size: int, source: tuple[int, int], n: int, args) -> dict:
    path = root / f"jpeg{size}"
    nbytes = write_dataset(path, n, *source, seed=size)
    mb_per_sample = nbytes / n / 2**20
    dataset = ShardDataset(path)
    rows = [(shard, i) for shard, count in enumerate(dataset.shard_rows) for i in range(count)]
    read = rate(lambda r: dataset.row(*r), rows)
    samples = [dataset.row(*r) for r in rows]
    images = [s["segments"][0]["image"] for s in samples]
    decode = rate(lambda b: decode_image(b, (size, size)), images)
    processor = SampleProcessor(tokenizer, ProcessConfig(image_size=(size, size), downsample=16))
    process = rate(lambda s: processor(s, (0, 0)), samples)
    processed = [processor(s, (0, 0)) for s in samples]
    seq_len = 2 * len(processed[0]) + 8
    packer = Packer(PackConfig(seq_len=seq_len, micro_batch_size=4))

    def pack(s):
        out = packer.add(0, s)
        if out:
            collate_rows(out, seq_len, tokenizer.pad_id, tokenizer.image_placeholder_id, (size, size))

    packing = rate(pack, processed)
    row = {
        "resolution": size,
        "source": f"{source[0]}x{source[1]} JPEG",
        "mb_per_sample": round(mb_per_sample, 4),
        "read_samples_s": read,
        "read_mb_s": read * mb_per_sample,
        "decode_resize_samples_s": decode,
        "process_samples_s": process,
        "pack_collate_samples_s": packing,
    }
    for workers in (0, 2):
        cfg = LoaderConfig(
            datasets=[str(path)], num_workers=workers, image_size=(size, size), downsample=16, seq_len=seq_len,
            micro_batch_size=4,
        )  # fmt: skip
        loader = build_train_loader(cfg, tokenizer)
        next(loader)
        start, count = time.perf_counter(), 0
        while count < n:
            count += next(loader)["num_samples"]
        loader_rate = count / (time.perf_counter() - start)
        row[f"loader_w{workers}_samples_s"] = loader_rate
        row[f"loader_w{workers}_vs_step"] = loader_rate / (args.step_samples / args.step_seconds)
    return row


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", type=int, default=600)
    parser.add_argument(
        "--step-seconds", type=float, default=1.0, help="training step time to compare against"
    )
    parser.add_argument("--step-samples", type=int, default=64, help="images one rank consumes per step")
    parser.add_argument("--out", default="benchmarks/results/data_pipeline.json")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        corpus = [s["segments"][0]["text"] for s in text_samples(np.random.default_rng(0), 2000, "t")]
        tokenizer = train_sentencepiece(corpus, root / "tok", vocab_size=128)
        for size, source in ((256, (500, 375)), (512, (1000, 750))):
            results.append(bench_resolution(root, tokenizer, size, source, args.samples, args))
    columns = [k for k in results[0] if k not in ("source",)]
    print(" | ".join(f"{c:>14}" if len(c) < 15 else c for c in columns))
    for row in results:
        print(
            " | ".join(f"{row[c]:>14.1f}" if isinstance(row[c], float) else f"{row[c]:>14}" for c in columns)
        )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"cpu_count": os.cpu_count(), "load_average": os.getloadavg(), "samples": args.samples}
    out.write_text(json.dumps({"meta": meta, "results": results}, indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
