"""Bad input never crashes the loader: each case is skipped, counted by reason and logged once; too many stop the run."""

import io
import logging
from collections import Counter

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image

from data_pipeline.loader import DataSkipRateError, LoaderConfig, build_train_loader
from data_pipeline.shards import ShardWriter
from data_pipeline.synthetic import glyph_samples
from data_pipeline.text_tokenizer import train_sentencepiece


def png(seed):
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (24, 48, 3), dtype=np.uint8)).save(
        buf, "PNG"
    )
    return buf.getvalue()


def caption(sample_id, image, text="red abc"):
    return {
        "id": sample_id,
        "source": "test",
        "task": "caption",
        "segments": [
            {"text": None, "image": image, "role": None},
            {"text": text, "image": None, "role": None},
        ],
    }


BAD = {
    "undecodable_image": [caption("garbage", b"\x89PNG not really"), caption("truncated", png(1)[:200])],
    "empty_text": [caption("blank", png(2), text="  ")],
}


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    texts = [f"{c} {a}{b}" for c in ("red", "green") for a in "abcdefghkm" for b in "abcdefghkm"]
    return train_sentencepiece(texts, tmp_path_factory.mktemp("tok"), vocab_size=48)


def write(path, samples, batch_rows=4, shard_mb=0.02):
    with ShardWriter(path, shard_size_mb=shard_mb, batch_rows=batch_rows) as w:
        for s in samples:
            w.write(s)


def loader_for(path, tokenizer, **kw):
    cfg = LoaderConfig(datasets=[str(path)], image_size=(8, 16), seq_len=24, micro_batch_size=2, seed=3, **kw)
    return build_train_loader(cfg, tokenizer)


def run_epoch(loader):
    while loader.epoch == 0:
        next(loader)


def reference_skips(loader, bad_ids):
    """Skips by reason among the items received so far, from the row ids read back with plain pyarrow."""
    ids = {}
    for dataset in loader.datasets:
        for s, entry in enumerate(dataset.manifest["shards"]):
            try:
                table = pa.ipc.open_file(pa.memory_map(str(dataset.dir / entry["path"]))).read_all()
                ids.update({(s, r): i for r, i in enumerate(table.column("id").to_pylist())})
            except (OSError, pa.ArrowInvalid):
                ids.update({(s, r): "<corrupt>" for r in range(entry["num_rows"])})
    length = loader.mixture.epoch_length
    received = [(0, p) for p in range(length)] + [(1, p) for p in range(loader.streams[0].cursor)]
    counts = Counter()
    for epoch, position in received:
        draw = loader.mixture.locate(epoch, position)
        row_id = ids[(draw.shard, draw.row)]
        reason = "corrupt_shard" if row_id == "<corrupt>" else bad_ids.get(row_id)
        if reason:
            counts[reason] += 1
    return counts


def test_bad_samples_are_skipped_counted_and_logged_once(tmp_path, tokenizer, caplog):
    good = list(glyph_samples(np.random.default_rng(0), 20, "good"))
    samples = good[:7] + BAD["undecodable_image"] + good[7:14] + BAD["empty_text"] + good[14:]
    write(tmp_path / "d", samples)
    loader = loader_for(tmp_path / "d", tokenizer, max_skip_fraction=0.5)
    with caplog.at_level(logging.WARNING, logger="data_pipeline.loader"):
        run_epoch(loader)
    bad_ids = {s["id"]: reason for reason, group in BAD.items() for s in group}
    assert loader.stats["skipped"] == reference_skips(loader, bad_ids)
    assert set(loader.stats["skipped"]) == {"undecodable_image", "empty_text"}
    messages = [r.getMessage() for r in caplog.records]
    assert (
        sum("undecodable_image" in m for m in messages) == 1
        and sum("(empty_text)" in m for m in messages) == 1
    )
    assert any("garbage" in m or "truncated" in m for m in messages)  # the log names the sample id


def test_corrupt_shard_is_skipped(tmp_path, tokenizer):
    write(tmp_path / "d", list(glyph_samples(np.random.default_rng(0), 24, "g")), batch_rows=4, shard_mb=0.02)
    shards = sorted((tmp_path / "d").glob("*.arrow"))
    assert len(shards) >= 2
    data = shards[1].read_bytes()
    shards[1].write_bytes(data[: len(data) // 2])
    loader = loader_for(tmp_path / "d", tokenizer, max_skip_fraction=0.9)
    run_epoch(loader)
    assert loader.stats["skipped"] == reference_skips(loader, {})
    assert loader.stats["skipped"]["corrupt_shard"] > 0


def test_row_outside_the_dataset_names_the_layout(tmp_path):
    from data_pipeline.shards import ShardDataset

    write(tmp_path / "d", list(glyph_samples(np.random.default_rng(0), 24, "g")), batch_rows=4, shard_mb=0.02)
    dataset = ShardDataset(tmp_path / "d")
    assert len(dataset.shard_rows) >= 2
    last = dataset.row(len(dataset.shard_rows) - 1, dataset.shard_rows[-1] - 1)
    assert last["id"].startswith("g")
    with pytest.raises(IndexError, match=rf"no row \(0, {dataset.shard_rows[0]}\).*shards of"):
        dataset.row(0, dataset.shard_rows[0])


def test_skip_rate_above_threshold_stops_with_clear_error(tmp_path, tokenizer):
    samples = [caption(f"bad{i}", b"junk") for i in range(10)] + list(
        glyph_samples(np.random.default_rng(0), 10, "g")
    )
    write(tmp_path / "d", samples)
    loader = loader_for(tmp_path / "d", tokenizer, max_skip_fraction=0.2, min_samples_for_skip_check=8)
    with pytest.raises(DataSkipRateError, match=r"max_skip_fraction=0.2.*undecodable_image"):
        run_epoch(loader)


def test_overlong_samples_truncated_or_dropped_and_counted(tmp_path, tokenizer):
    long_text = " ".join(["red abc"] * 30)
    write(tmp_path / "d", [caption(f"long{i}", png(i), text=long_text) for i in range(6)])
    for mode, key in (("truncate", "overlong_truncated"), ("drop", "overlong_dropped")):
        loader = loader_for(tmp_path / "d", tokenizer, overlong=mode)
        emitted = 0
        if mode == "truncate":
            batch = next(loader)
            assert (
                batch["input_ids"].shape == (2, 24)
                and batch["image_mask"].sum() == 2 * batch["images"].shape[0]
            )
            emitted = batch["num_samples"]
        else:
            with pytest.raises(DataSkipRateError):
                run_epoch(loader)  # nothing usable: every sample dropped, never silently
        counts = loader.stats if mode == "truncate" else loader.stats["skipped"]
        assert counts[key] >= max(emitted, 1)
