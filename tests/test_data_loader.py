"""Loader resume: an interrupted stream equals the uninterrupted one; a world-size change skips and repeats nothing.

The reference is always an independent run of the loader from scratch (same config), and for the epoch coverage the
row ids read back from the shards with plain pyarrow.
"""

import json
from collections import Counter

import numpy as np
import pyarrow as pa
import pytest
import torch

from data_pipeline.loader import LoaderConfig, build_train_loader
from data_pipeline.shards import ShardWriter
from data_pipeline.synthetic import glyph_samples, text_samples
from data_pipeline.text_tokenizer import train_sentencepiece

NUM_GLYPH, NUM_TEXT = 45, 30


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("loader")
    with ShardWriter(root / "glyph", shard_size_mb=1, batch_rows=8) as w:
        for s in glyph_samples(np.random.default_rng(0), NUM_GLYPH, "g"):
            w.write(s)
    with ShardWriter(root / "text", shard_size_mb=0.0005, batch_rows=4) as w:
        for s in text_samples(np.random.default_rng(1), NUM_TEXT, "t"):
            w.write(s)
    corpus = [s["segments"][0]["text"] for s in text_samples(np.random.default_rng(2), 300, "c")]
    tokenizer = train_sentencepiece(corpus, root / "tok", vocab_size=64)
    return root, tokenizer


def make_loaders(data, world_size, num_workers, datasets=("glyph",), weights=None, **kw):
    root, tokenizer = data
    loaders = []
    for rank in range(world_size):
        cfg = LoaderConfig(
            datasets=[str(root / d) for d in datasets],
            weights=weights,
            rank=rank,
            world_size=world_size,
            num_workers=num_workers,
            seed=7,
            image_size=(8, 16),
            seq_len=24,
            micro_batch_size=2,
            prefetch_factor=2,
            **kw,
        )
        loaders.append(build_train_loader(cfg, tokenizer))
    return loaders


def take(loaders, steps):
    """steps x (one batch from every rank) -> per rank list of (batch, keys)."""
    out = [[] for _ in loaders]
    for _ in range(steps):
        for rank, loader in enumerate(loaders):
            batch = next(loader)
            out[rank].append((batch, list(loader.last_batch_keys)))
    return out


def assert_same_batches(a, b):
    assert len(a) == len(b)
    for (ba, ka), (bb, kb) in zip(a, b):
        assert ka == kb
        assert ba.keys() == bb.keys()
        for key in ba:
            if torch.is_tensor(ba[key]):
                assert torch.equal(ba[key], bb[key]), key
            else:
                assert ba[key] == bb[key], key


def save_state(loaders):
    from data_pipeline.loader import merge_states

    state = merge_states([lo.local_state() for lo in loaders], loaders[0]._header())
    return json.loads(json.dumps(state))  # must survive JSON


@pytest.mark.parametrize(
    "world_size,num_workers,resume_workers", [(1, 0, 0), (1, 2, 1), (1, 2, 0), (2, 1, 2), (2, 0, 0)]
)
def test_resume_continues_exactly(data, world_size, num_workers, resume_workers):
    steps, cut = 14, (3, 9)  # 14 steps x 2 rows cross the 45-sample epoch; both cuts are mid-pack
    reference = take(make_loaders(data, world_size, num_workers), steps)
    pieces = [[] for _ in range(world_size)]
    loaders = make_loaders(data, world_size, num_workers)
    done = 0
    for stop in (*cut, steps):
        part = take(loaders, stop - done)
        for rank in range(world_size):
            pieces[rank] += part[rank]
        done = stop
        state = save_state(loaders)
        assert any(s["pending"] for r in state["ranks"] for s in r["streams"]), (
            "the cut should leave samples in the packer"
        )
        loaders = make_loaders(data, world_size, resume_workers)
        for loader in loaders:
            loader.load_state_dict(state)
    for rank in range(world_size):
        assert_same_batches(pieces[rank], reference[rank])


def epoch_coverage(emitted, loaders, epoch):
    """Count of each position of `epoch` that was emitted in a batch or still sits in a packer."""
    counts = Counter(pos for e, pos in emitted if e == epoch)
    for loader in loaders:
        counts.update(pos for e, pos in loader.pending_keys() if e == epoch)
    return counts


@pytest.mark.parametrize(
    "old_world,new_world,old_streams,new_streams", [(2, 1, 1, 1), (1, 2, 1, 1), (2, 3, 1, 1), (2, 1, 2, 3)]
)
def test_world_size_change_covers_epoch_once(data, old_world, new_world, old_streams, new_streams):
    """A new world size or number of packing streams lays the unconsumed positions out again: every position of
    the epoch is trained on exactly once."""
    loaders = make_loaders(data, old_world, 0, pack_streams=old_streams)
    emitted = [k for rank in take(loaders, 4) for _, keys in rank for k in keys]
    state = save_state(loaders)
    loaders = make_loaders(data, new_world, 0, pack_streams=new_streams)
    for loader in loaders:
        loader.load_state_dict(state)
    while min(lo.epoch for lo in loaders) == 0:
        emitted += [k for rank in take(loaders, 1) for _, keys in rank for k in keys]
    counts = epoch_coverage(emitted, loaders, 0)
    assert sorted(counts) == list(range(NUM_GLYPH))
    assert set(counts.values()) == {1}


def test_epoch_visits_every_row_once_in_shuffled_order(data):
    root, tokenizer = data
    ids = []
    for path in sorted((root / "glyph").glob("*.arrow")):
        ids += pa.ipc.open_file(pa.memory_map(str(path))).read_all().column("id").to_pylist()
    loader = make_loaders(data, 1, 0)[0]
    source = loader.source
    seen = [source.fetch(0, p).sample_id.split("/")[-1] for p in range(loader.mixture.epoch_length)]
    assert sorted(seen) == sorted(ids)
    assert seen != ids  # shuffled
    seen_next = [source.fetch(1, p).sample_id.split("/")[-1] for p in range(loader.mixture.epoch_length)]
    assert sorted(seen_next) == sorted(ids) and seen_next != seen


def test_mixture_weights_and_resume(data):
    loaders = make_loaders(data, 1, 0, datasets=("glyph", "text"), weights=[3.0, 1.0])
    mixture = loaders[0].mixture
    draws = Counter(mixture.locate(0, p).dataset for p in range(mixture.epoch_length))
    assert draws[0] == 3 * draws[1] and draws[0] >= NUM_GLYPH
    reference = take(make_loaders(data, 1, 0, datasets=("glyph", "text"), weights=[3.0, 1.0]), 8)
    first = take(loaders, 5)
    state = save_state(loaders)
    resumed = make_loaders(data, 1, 0, datasets=("glyph", "text"), weights=[3.0, 1.0])
    resumed[0].load_state_dict(state)
    assert_same_batches(first[0] + take(resumed, 3)[0], reference[0])


def test_state_from_other_config_is_rejected(data):
    loaders = make_loaders(data, 1, 0)
    take(loaders, 1)
    state = save_state(loaders)
    other = make_loaders(data, 1, 0, datasets=("glyph", "text"))
    with pytest.raises(ValueError, match="datasets"):
        other[0].load_state_dict(state)
