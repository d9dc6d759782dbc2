"""The embedded default dataset: text-in-image captioning, generated locally (no download), deterministic per seed.

Two image tasks, where the caption can only be right if the text in the image is read (where ETT's gain shows):

- **glyph grid** (default; the demo's task, on which ETT beats the frozen-tokenizer baselines, README "The demo"):
  24x48 RGB, 3 upper-case letters from the 10-letter alphabet "abcdefghkm" (DejaVu Sans Mono Bold, 18-22 px),
  letter k centred in the 16-px cell k with +-2 px jitter, on a red or green background with brightness jitter, a
  linear gradient and Gaussian noise (sigma 4). Caption: "<colour> <letters>", e.g. "red kbf".
- **words in noise** (harder): 32x64 RGB, one or two words in a random DejaVu face, 11-18 px, 8 text colours,
  rotated +-15 degrees at a random position, on a textured background (stripes or blotches) with noise sigma 8-24.
  Caption: "<text colour> text on <background colour>: <words>".

`python -m data_pipeline.synthetic --out DIR [--seed S] [--num-train N] [--num-eval N]` writes, each with its own
manifest: caption_train, caption_heldout (new renderings), words_train, words_heldout, t2i_train (caption then
image), chat_train (user image + question, assistant answer), text_train (captions without images, for text-only
LLM pretraining), and a sentencepiece tokenizer trained on the text in DIR/tokenizer.
"""

from __future__ import annotations

import argparse
import io
import logging
import time
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from data_pipeline.schema import image_segment, text_segment
from data_pipeline.shards import ShardWriter
from data_pipeline.text_tokenizer import train_sentencepiece

log = logging.getLogger(__name__)

GRID_ALPHABET = "abcdefghkm"
GRID_COLOURS = {"red": (200, 45, 40), "green": (45, 150, 60)}
WORD_COLOURS = {
    "red": (210, 40, 40),
    "green": (40, 160, 60),
    "blue": (40, 70, 210),
    "yellow": (230, 210, 40),
    "white": (245, 245, 245),
    "black": (15, 15, 15),
    "orange": (240, 140, 30),
    "purple": (140, 50, 170),
}
WORDS = (
    "stop open shop cafe exit sale park bank taxi hotel bus inn way gate road mill farm dock bar pub zoo art "
    "fish bread milk tea wine gold star moon sun rain snow wind fire ice rock sand sea lake hill tree leaf rose "
    "bird cat dog fox owl bee cow pig hen ant bear wolf deer frog duck goat lion mole seal swan toad yak eel "
    "north south east west left right up down in out new old big small hot cold fast slow"
).split()
FONT_FILES = (
    "DejaVuSans.ttf",
    "DejaVuSans-Bold.ttf",
    "DejaVuSerif.ttf",
    "DejaVuSerif-Bold.ttf",
    "DejaVuSansMono.ttf",
    "DejaVuSansMono-Bold.ttf",
)


@lru_cache(maxsize=256)
def _font(name: str, size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    """A TrueType font PIL can find; PIL's bundled default font when the DejaVu files are not installed."""
    try:
        return ImageFont.truetype(name, size)
    except OSError:
        return ImageFont.load_default(size)


@lru_cache(maxsize=16)
def _grid(height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    return yy / height, xx / width


def _background(rng: np.random.Generator, height: int, width: int, rgb, noise: float) -> np.ndarray:
    """rgb x brightness jitter + a linear gradient in a random direction + Gaussian noise -> float [H, W, 3]."""
    base = np.asarray(rgb, dtype=np.float32) * rng.uniform(0.8, 1.2)
    angle = rng.uniform(0, 2 * np.pi)
    yy, xx = _grid(height, width)
    ramp = (np.cos(angle) * xx + np.sin(angle) * yy) * rng.uniform(-30, 30)
    return base + ramp[..., None] + rng.normal(0, noise, (height, width, 3)).astype(np.float32)


@lru_cache(maxsize=1024)
def _glyph_mask(letter: str, size: int, box: int) -> np.ndarray:
    """Coverage in [0, 1] of `letter` drawn centred in a box x box square: float [box, box, 1]."""
    layer = Image.new("L", (box, box), 0)
    ImageDraw.Draw(layer).text(
        (box / 2, box / 2), letter, fill=255, font=_font("DejaVuSansMono-Bold.ttf", size), anchor="mm"
    )
    return np.asarray(layer, dtype=np.float32)[..., None] / 255


def _to_image(pixels: np.ndarray) -> Image.Image:
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "RGB")


def _contrast_ink(rgb) -> tuple[int, int, int]:
    luminance = 0.299 * rgb[0] + 0.587 * rgb[1] + 0.114 * rgb[2]
    return (0, 0, 0) if luminance > 110 else (255, 255, 255)


def render_glyph_grid(
    rng: np.random.Generator,
    num_letters: int = 3,
    alphabet: str = GRID_ALPHABET,
    cell: int = 16,
    height: int = 24,
    font_px: tuple[int, int] = (18, 22),
    jitter: int = 2,
    noise: float = 4.0,
) -> tuple[Image.Image, str, str]:
    """Config-E glyph grid: returns (RGB image [height, num_letters*cell], letters (lower case), colour name)."""
    letters = "".join(rng.choice(list(alphabet), num_letters))
    colour = str(rng.choice(list(GRID_COLOURS)))
    width, box = num_letters * cell, 2 * height
    pixels = _background(rng, height, width, GRID_COLOURS[colour], noise)
    canvas = np.zeros((height + 2 * box, width + 2 * box, 1), np.float32)
    for k, letter in enumerate(letters):
        mask = _glyph_mask(letter.upper(), int(rng.integers(font_px[0], font_px[1] + 1)), box)
        dx, dy = rng.integers(-jitter, jitter + 1, 2)
        top, left = box + height // 2 + dy - box // 2, box + k * cell + cell // 2 + dx - box // 2
        canvas[top : top + box, left : left + box] = np.maximum(
            canvas[top : top + box, left : left + box], mask
        )
    alpha = canvas[box : box + height, box : box + width]
    ink = np.asarray(_contrast_ink(GRID_COLOURS[colour]), dtype=np.float32)
    image = _to_image(pixels * (1 - alpha) + ink * alpha)
    return image, letters, colour


def render_words_in_noise(
    rng: np.random.Generator, height: int = 32, width: int = 64, font_px: tuple[int, int] = (11, 18)
) -> tuple[Image.Image, str, str, str]:
    """Harder variant: returns (RGB image [height, width], words, text colour name, background colour name)."""
    words = " ".join(rng.choice(WORDS, int(rng.integers(1, 3))))
    bg_name, ink_name = rng.choice(list(WORD_COLOURS), 2, replace=False)
    pixels = _background(rng, height, width, WORD_COLOURS[bg_name], noise=float(rng.uniform(8, 24)))
    if rng.random() < 0.5:
        period, phase = rng.uniform(3, 9), rng.uniform(0, 2 * np.pi)
        axis = np.mgrid[0:height, 0:width][int(rng.integers(0, 2))]
        pixels += (18 * np.sin(axis / period * 2 * np.pi + phase))[..., None]
    else:
        blotches = rng.normal(0, 25, (height // 8 + 1, width // 8 + 1, 3))
        pixels += np.kron(blotches, np.ones((8, 8, 1)))[:height, :width]
    font = _font(str(rng.choice(FONT_FILES)), int(rng.integers(font_px[0], font_px[1] + 1)))
    layer = Image.new("L", (width * 2, height * 2), 0)
    ImageDraw.Draw(layer).text((width, height), words.upper(), fill=255, font=font, anchor="mm")
    layer = layer.rotate(float(rng.uniform(-15, 15)), resample=Image.BILINEAR)
    cx = int(rng.integers(width // 2 - width // 6, width // 2 + width // 6 + 1))
    cy = int(rng.integers(height // 2 - height // 6, height // 2 + height // 6 + 1))
    alpha = (
        np.asarray(layer, dtype=np.float32)[height - cy : 2 * height - cy, width - cx : 2 * width - cx, None]
        / 255
    )
    pixels = pixels * (1 - alpha) + np.asarray(WORD_COLOURS[ink_name], dtype=np.float32) * alpha
    return _to_image(pixels), words, str(ink_name), str(bg_name)


def png_bytes(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG", compress_level=0)
    return buf.getvalue()


def glyph_caption(letters: str, colour: str) -> str:
    return f"{colour} {letters}"


def words_caption(words: str, ink: str, background: str) -> str:
    return f"{ink} text on {background}: {words}"


def _sample(sample_id: str, task: str, segments: list[dict]) -> dict:
    return {"id": sample_id, "source": "synthetic", "task": task, "segments": segments}


def glyph_samples(rng: np.random.Generator, n: int, prefix: str, task: str = "caption"):
    """Caption samples (image, caption) or t2i samples (caption, image) of the glyph-grid task."""
    for i in range(n):
        image, letters, colour = render_glyph_grid(rng)
        caption, image = text_segment(glyph_caption(letters, colour)), image_segment(png_bytes(image))
        yield _sample(f"{prefix}-{i:07d}", task, [caption, image] if task == "t2i" else [image, caption])


def words_samples(rng: np.random.Generator, n: int, prefix: str):
    for i in range(n):
        image, words, ink, background = render_words_in_noise(rng)
        caption = words_caption(words, ink, background)
        yield _sample(
            f"{prefix}-{i:07d}", "caption", [image_segment(png_bytes(image)), text_segment(caption)]
        )


CHAT_QUESTIONS = (
    ("What letters are written in the image?", lambda letters, colour: f"The letters are {letters.upper()}."),
    ("What colour is the background?", lambda letters, colour: f"The background is {colour}."),
    (
        "Describe the image.",
        lambda letters, colour: f"The letters {letters.upper()} on a {colour} background.",
    ),
)


def chat_samples(rng: np.random.Generator, n: int, prefix: str):
    """Two-turn chat: user image + question, assistant answer, second question and answer (no image)."""
    for i in range(n):
        image, letters, colour = render_glyph_grid(rng)
        first, second = rng.choice(len(CHAT_QUESTIONS), 2, replace=False)
        segments = [image_segment(png_bytes(image), role="user")]
        for q in (first, second):
            question, answer = CHAT_QUESTIONS[q]
            segments += [
                text_segment(question, role="user"),
                text_segment(answer(letters, colour), role="assistant"),
            ]
        yield _sample(f"{prefix}-{i:07d}", "chat", segments)


def text_samples(rng: np.random.Generator, n: int, prefix: str):
    """Text-only corpus for LLM pretraining: the captions of both tasks, without their images."""
    for i in range(n):
        if rng.random() < 0.7:
            letters = "".join(rng.choice(list(GRID_ALPHABET), 3))
            text = glyph_caption(letters, str(rng.choice(list(GRID_COLOURS))))
        else:
            ink, background = rng.choice(list(WORD_COLOURS), 2, replace=False)
            text = words_caption(
                " ".join(rng.choice(WORDS, int(rng.integers(1, 3)))), str(ink), str(background)
            )
        yield _sample(f"{prefix}-{i:07d}", "text", [text_segment(text)])


def write_synthetic(
    out: str | Path, seed: int = 0, num_train: int = 20000, num_eval: int = 1000
) -> dict[str, int]:
    """Write every split under `out` (one dataset directory each) and the tokenizer; returns {split: samples}."""
    out = Path(out)
    splits = {
        "caption_train": lambda rng: glyph_samples(rng, num_train, "glyph-train"),
        "caption_heldout": lambda rng: glyph_samples(rng, num_eval, "glyph-heldout"),
        "words_train": lambda rng: words_samples(rng, max(1, num_train // 4), "words-train"),
        "words_heldout": lambda rng: words_samples(rng, num_eval, "words-heldout"),
        "t2i_train": lambda rng: glyph_samples(rng, max(1, num_train // 4), "t2i-train", task="t2i"),
        "chat_train": lambda rng: chat_samples(rng, max(1, num_train // 10), "chat-train"),
        "text_train": lambda rng: text_samples(rng, num_train, "text-train"),
    }
    counts, corpus = {}, []
    for index, (split, make) in enumerate(splits.items()):
        rng = np.random.default_rng([seed, index])
        with ShardWriter(out / split, shard_size_mb=64, source=f"synthetic/{split}") as writer:
            for sample in make(rng):
                writer.write(sample)
                if split in ("text_train", "chat_train"):
                    corpus += [s["text"] for s in sample["segments"] if s["text"] is not None]
        counts[split] = sum(s["num_rows"] for s in writer.shards)
    train_sentencepiece(corpus, out / "tokenizer", vocab_size=256)
    return counts


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="output directory (one dataset directory per split)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--num-train", type=int, default=20000, help="glyph-grid caption training samples")
    parser.add_argument("--num-eval", type=int, default=1000, help="samples per held-out split")
    args = parser.parse_args(argv)
    if args.num_train < 1 or args.num_eval < 1:
        parser.error("--num-train and --num-eval must be >= 1")
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    start = time.perf_counter()
    counts = write_synthetic(args.out, args.seed, args.num_train, args.num_eval)
    for split, n in counts.items():
        log.info("%-16s %7d samples  %s", split, n, Path(args.out) / split)
    log.info(
        "tokenizer        %s  (%.1f s in all)", Path(args.out) / "tokenizer", time.perf_counter() - start
    )


if __name__ == "__main__":
    main()
