"""The synthetic dataset: deterministic per seed, readable by plain pyarrow, captions state what the image shows."""

import io
import subprocess
import sys

import numpy as np
import pyarrow as pa
from PIL import Image

from data_pipeline.shards import read_manifest
from data_pipeline.synthetic import GRID_ALPHABET, GRID_COLOURS, render_glyph_grid, render_words_in_noise


def test_renderers_are_deterministic_and_sized():
    a, letters, colour = render_glyph_grid(np.random.default_rng(4))
    b, letters_b, _ = render_glyph_grid(np.random.default_rng(4))
    assert a.size == (48, 24) and np.array_equal(np.asarray(a), np.asarray(b)) and letters == letters_b
    assert len(letters) == 3 and set(letters) <= set(GRID_ALPHABET) and colour in GRID_COLOURS
    # the background colour dominates the image it names
    mean = np.asarray(a, dtype=float).reshape(-1, 3).mean(0)
    assert (mean[0] > mean[1]) == (colour == "red")
    image, words, ink, background = render_words_in_noise(np.random.default_rng(5))
    assert image.size == (64, 32) and words and ink != background


def test_cli_is_deterministic(tmp_path, subprocess_env, repo_root):
    def run(out):
        cmd = [
            sys.executable,
            "-m",
            "data_pipeline.synthetic",
            "--out",
            str(out),
            "--seed",
            "3",
            "--num-train",
            "40",
            "--num-eval",
            "8",
        ]
        done = subprocess.run(
            cmd, capture_output=True, text=True, env=subprocess_env, cwd=repo_root, timeout=300
        )
        assert done.returncode == 0, done.stderr

    run(tmp_path / "a")
    run(tmp_path / "b")
    for split in ("caption_train", "caption_heldout", "words_train", "t2i_train", "chat_train", "text_train"):
        manifest = read_manifest(tmp_path / "a" / split)
        assert manifest == read_manifest(tmp_path / "b" / split)
        for shard in manifest["shards"]:
            assert (tmp_path / "a" / split / shard["path"]).read_bytes() == (
                tmp_path / "b" / split / shard["path"]
            ).read_bytes()
    rows = (
        pa.ipc.open_file(str(tmp_path / "a" / "caption_train" / "shard-00000.arrow")).read_all().to_pylist()
    )
    assert len(rows) == 40 and rows[0]["task"] == "caption"
    image = Image.open(io.BytesIO(rows[0]["segments"][0]["image"]))
    assert image.format == "PNG" and image.size == (48, 24)
    held = (
        pa.ipc.open_file(str(tmp_path / "a" / "caption_heldout" / "shard-00000.arrow")).read_all().to_pylist()
    )
    assert {r["segments"][0]["image"] for r in held}.isdisjoint({r["segments"][0]["image"] for r in rows})
    assert (tmp_path / "a" / "tokenizer" / "tokenizer.json").is_file()
