"""Processing and packing against naive references: token layout, labels, masks, pixels, CFG dropout, batch fields."""

import io

import numpy as np
import pytest
import sentencepiece as spm
import torch
from PIL import Image, ImageOps

from data_pipeline.packing import PackConfig, Packer, collate_rows
from data_pipeline.processing import IGNORE, ProcessConfig, SampleProcessor
from data_pipeline.synthetic import render_glyph_grid, text_samples
from data_pipeline.text_tokenizer import train_sentencepiece


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    out = tmp_path_factory.mktemp("tok")
    corpus = [s["segments"][0]["text"] for s in text_samples(np.random.default_rng(0), 500, "t")]
    corpus += ["What letters are written?", "The letters are ABC."] * 20
    train_sentencepiece(corpus, out, vocab_size=80)
    from data_pipeline.text_tokenizer import TextTokenizer

    return TextTokenizer.load(out), spm.SentencePieceProcessor(model_file=str(out / "spm.model"))


def png_of(image):
    buf = io.BytesIO()
    image.save(buf, "PNG")
    return buf.getvalue()


def seg(text=None, image=None, role=None):
    return {"text": text, "image": image, "role": role}


def naive_span(sp, h, w):
    p = sp.piece_to_id
    return [p("<|image_start|>")] + ([p("<|image|>")] * w + [p("<|row_end|>")]) * h + [p("<|image_end|>")]


def test_caption_layout_labels_and_pixels(tok):
    tokenizer, sp = tok
    image, letters, colour = render_glyph_grid(np.random.default_rng(0))
    text = f"{colour} {letters}"
    sample = {
        "id": "x",
        "source": "s",
        "task": "caption",
        "segments": [seg(image=png_of(image)), seg(text=text)],
    }
    out = SampleProcessor(tokenizer, ProcessConfig(image_size=(16, 16), downsample=8))(sample, (0, 0))
    span, words = naive_span(sp, 2, 2), sp.encode(text)
    expected = [sp.piece_to_id("<|bos|>")] + span + words + [sp.piece_to_id("<|eos|>")]
    assert out.input_ids.tolist() == expected
    # labels[t] = token t+1 for caption words and EOS, -100 elsewhere
    n_prefix = 1 + len(span)
    want = [IGNORE] * (n_prefix - 1) + words + [sp.piece_to_id("<|eos|>"), IGNORE]
    assert out.labels.tolist() == want and not out.image_loss_mask.any()
    reference = np.asarray(ImageOps.fit(image.convert("RGB"), (16, 16), Image.BILINEAR)).transpose(2, 0, 1)
    diff = np.abs(
        out.images[0].astype(int) - reference.astype(int)
    )  # two antialiased bilinear kernels (PIL, torch)
    assert out.images[0].shape == (3, 16, 16) and diff.mean() < 1.5 and diff.max() < 40


def test_chat_loss_on_assistant_turns_only(tok):
    tokenizer, sp = tok
    image, _, _ = render_glyph_grid(np.random.default_rng(1))
    q, a = "What letters are written?", "The letters are ABC."
    sample = {"id": "c", "source": "s", "task": "chat", "segments": [
        seg(image=png_of(image), role="user"), seg(text=q, role="user"), seg(text=a, role="assistant"),
        seg(text=q, role="user"), seg(text=a, role="assistant")]}  # fmt: skip
    out = SampleProcessor(tokenizer, ProcessConfig(image_size=(8, 8), downsample=8))(sample, (0, 0))
    i = sp.piece_to_id
    turn_a = [i("<|assistant|>")] + sp.encode(a) + [i("<|eos|>")]
    expected = [i("<|bos|>"), i("<|user|>")] + naive_span(sp, 1, 1) + sp.encode(q) + turn_a
    expected += [i("<|user|>")] + sp.encode(q) + turn_a
    assert out.input_ids.tolist() == expected
    targets = [int(t) for t in out.labels if t != IGNORE]
    assert targets == (sp.encode(a) + [i("<|eos|>")]) * 2


def test_t2i_image_targets_and_deterministic_caption_dropout(tok):
    tokenizer, sp = tok
    image, letters, colour = render_glyph_grid(np.random.default_rng(2))
    sample = {
        "id": "t",
        "source": "s",
        "task": "t2i",
        "segments": [seg(text=f"{colour} {letters}"), seg(image=png_of(image))],
    }
    proc = SampleProcessor(
        tokenizer, ProcessConfig(image_size=(16, 24), downsample=8, caption_dropout=0.3, seed=5)
    )
    outs = [proc(sample, (0, k)) for k in range(400)]
    dropped = [
        len(o) == 1 + 2 * 4 + 2 + 1 for o in outs
    ]  # BOS + span (2 rows of 3 + ROW_END, start, end) + EOS
    assert 0.2 < np.mean(dropped) < 0.4
    assert [len(proc(sample, (0, k))) for k in range(400)] == [
        len(o) for o in outs
    ]  # same key, same decision
    out = outs[dropped.index(False)]
    placeholder = sp.piece_to_id("<|image|>")
    nxt = np.append(out.input_ids[1:], -1)
    assert out.image_loss_mask.tolist() == (nxt == placeholder).tolist() and out.image_loss_mask.sum() == 6
    assert (out.labels == IGNORE).all()


def test_packed_batch_matches_naive_concatenation(tok):
    tokenizer, _ = tok
    proc = SampleProcessor(tokenizer, ProcessConfig(image_size=(8, 16), downsample=8))
    rng = np.random.default_rng(3)
    samples = []
    for k in range(9):
        image, letters, colour = render_glyph_grid(rng)
        segments = [seg(image=png_of(image)), seg(text=f"{colour} {letters}" + " abc" * (k % 3))]
        samples.append(proc({"id": str(k), "source": "s", "task": "caption", "segments": segments}, (0, k)))
    packer, seq_len = Packer(PackConfig(seq_len=32, micro_batch_size=2)), 32
    batches = []
    for k, s in enumerate(samples):
        rows = packer.add(k, s)
        if rows:
            batches.append(
                (rows, collate_rows(rows, seq_len, tokenizer.pad_id, tokenizer.image_placeholder_id, (8, 16)))
            )
    assert batches
    order = [k for rows, _ in batches for row in rows for k, _ in row] + packer.pending_keys()
    assert order == list(range(9))  # arrival order kept, nothing lost
    for rows, batch in batches:
        assert batch["images"].shape[0] == sum(len(s.images) for row in rows for _, s in row)
        for b, row in enumerate(rows):
            ids = np.concatenate([s.input_ids for _, s in row])
            n = len(ids)
            assert batch["input_ids"][b, :n].tolist() == ids.tolist()
            assert (batch["input_ids"][b, n:] == tokenizer.pad_id).all() and (
                batch["labels"][b, n:] == IGNORE
            ).all()
            assert batch["position_ids"][b, :n].tolist() == [p for _, s in row for p in range(len(s))]
            assert batch["segment_ids"][b, :n].tolist() == [
                i + 1 for i, (_, s) in enumerate(row) for _ in range(len(s))
            ]
        assert batch["image_mask"].sum() == batch["images"].shape[0] * 1 * 2
        assert (
            batch["images"].min() >= -1
            and batch["images"].max() <= 1
            and batch["images"].dtype == torch.float32
        )
        assert batch["num_tokens"] == int((batch["segment_ids"] > 0).sum())


def test_bad_config_is_a_clear_error():
    with pytest.raises(ValueError, match="not divisible by downsample"):
        ProcessConfig(image_size=(20, 16), downsample=8)


@pytest.mark.parametrize(
    ("source", "target", "mode"),
    [((500, 375), (256, 256), "RGB"), ((1100, 700), (64, 96), "RGB"), ((640, 480), (128, 128), "L")],
)
def test_fast_jpeg_decode_gives_pils_pixels(monkeypatch, source, target, mode):
    """The simplejpeg path (libjpeg-turbo, reduced DCT scale for small targets) gives exactly the pixels of the PIL
    path, draft mode included (the second case decodes at 1/8 scale, the third is a grayscale JPEG)."""
    from data_pipeline import processing

    pytest.importorskip("simplejpeg")
    rng = np.random.default_rng(source[0])
    coarse = Image.fromarray(rng.integers(0, 255, (9, 12, 3), dtype=np.uint8)).resize(source, Image.BICUBIC)
    buf = io.BytesIO()
    coarse.convert(mode).save(buf, "JPEG", quality=90)
    data = buf.getvalue()
    fast = processing.decode_image(data, target)
    monkeypatch.setattr(processing, "simplejpeg", None)
    assert np.array_equal(fast, processing.decode_image(data, target))
    assert fast.shape == (3, *target)
