"""Converters: each input format round-trips into shards that plain pyarrow and `datasets` read back identically."""

import io
import json
import subprocess
import sys
import tarfile

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from data_pipeline.convert import convert


def image_bytes(seed, fmt="PNG"):
    pixels = np.random.default_rng(seed).integers(0, 255, (12, 20, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format=fmt)
    return buf.getvalue()


def read_back(out_dir):
    """Rows via plain pyarrow, and the same rows via datasets.load_dataset('arrow')."""
    import datasets  # here, not at the top: the suite collects without datasets (pytest -m gpu, bare machine)

    files = sorted(str(p) for p in out_dir.glob("*.arrow"))
    rows = [r for f in files for r in pa.ipc.open_file(pa.memory_map(f)).read_all().to_pylist()]
    hf = datasets.load_dataset(
        "arrow", data_files=files, split="train", cache_dir=str(out_dir.parent / "hf_cache")
    )
    assert hf.to_list() == rows
    manifest = json.loads((out_dir / "manifest.json").read_text())
    assert manifest["num_samples"] == len(rows) == sum(s["num_rows"] for s in manifest["shards"])
    return rows


def test_jsonl_pairs_and_interleaved(tmp_path):
    (tmp_path / "img").mkdir()
    images = {f"img/{i}.png": image_bytes(i) for i in range(3)}
    images["img/3.jpg"] = image_bytes(3, "JPEG")
    for name, data in images.items():
        (tmp_path / name).write_bytes(data)
    lines = [
        {"image": "img/0.png", "text": "a red sign"},
        {
            "id": "mix",
            "segments": [
                {"text": "before"},
                {"image": "img/1.png"},
                {"text": "after"},
                {"image": "img/3.jpg"},
            ],
        },
        {"image": "img/missing.png", "text": "gone"},
        {"image": "img/2.png", "text": "   "},
        {
            "id": "c",
            "task": "chat",
            "segments": [{"image": "img/2.png", "role": "user"}, {"text": "hi", "role": "assistant"}],
        },
    ]
    (tmp_path / "data.jsonl").write_text("\n".join(json.dumps(line) for line in lines) + "\nnot json\n")
    written, skips = convert(
        "jsonl", [str(tmp_path / "data.jsonl")], str(tmp_path / "out"), shard_size_mb=0.001
    )
    assert written == 3 and skips == {"missing_image_file": 1, "empty_text": 1, "invalid_record": 1}
    rows = read_back(tmp_path / "out")
    assert [r["task"] for r in rows] == ["caption", "interleaved", "chat"]
    assert (
        rows[0]["segments"][0]["image"] == images["img/0.png"]
        and rows[0]["segments"][1]["text"] == "a red sign"
    )
    mix = rows[1]["segments"]
    assert [s["text"] for s in mix] == ["before", None, "after", None]
    assert mix[1]["image"] == images["img/1.png"] and mix[3]["image"] == images["img/3.jpg"]  # bytes as given
    assert rows[2]["segments"][1]["role"] == "assistant"
    assert len(list((tmp_path / "out").glob("*.arrow"))) >= 2  # the tiny shard size rolled shards


def test_webdataset(tmp_path):
    with tarfile.open(tmp_path / "shard-0.tar", "w") as tar:
        for key, ext, payload in [
            ("a", "jpg", image_bytes(0, "JPEG")),
            ("a", "txt", b"first caption"),
            ("b", "png", image_bytes(1)),
            ("b", "json", json.dumps({"caption": "second"}).encode()),
            ("c", "txt", b"no image"),
            ("d", "jpg", b"\xff\xd8 not a jpeg"),
            ("d", "txt", b"broken"),
        ]:
            info = tarfile.TarInfo(f"{key}.{ext}")
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    written, skips = convert("webdataset", [str(tmp_path / "*.tar")], str(tmp_path / "out"))
    assert written == 2 and skips == {"missing_image_file": 1, "undecodable_image": 1}
    rows = read_back(tmp_path / "out")
    assert [(r["id"], r["segments"][1]["text"]) for r in rows] == [("a", "first caption"), ("b", "second")]
    assert rows[0]["segments"][0]["image"] == image_bytes(0, "JPEG")


def test_llava(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "x.png").write_bytes(image_bytes(5))
    conv = [
        {
            "id": "q1",
            "image": "x.png",
            "conversations": [
                {"from": "human", "value": "<image>\nWhat is it?"},
                {"from": "gpt", "value": "Noise."},
                {"from": "human", "value": "Sure?"},
                {"from": "gpt", "value": "Yes."},
            ],
        },
        {
            "id": "q2",
            "image": "nope.png",
            "conversations": [{"from": "human", "value": "<image>\nHi"}, {"from": "gpt", "value": "Hello"}],
        },
    ]
    (tmp_path / "llava.json").write_text(json.dumps(conv))
    written, skips = convert(
        "llava", [str(tmp_path / "llava.json")], str(tmp_path / "out"), image_root=str(tmp_path / "images")
    )
    assert written == 1 and skips == {"missing_image_file": 1}
    (row,) = read_back(tmp_path / "out")
    assert row["task"] == "chat"
    assert [(s["role"], s["text"]) for s in row["segments"]] == [
        ("user", None),
        ("user", "What is it?"),
        ("assistant", "Noise."),
        ("user", "Sure?"),
        ("assistant", "Yes."),
    ]
    assert row["segments"][0]["image"] == image_bytes(5)


def test_parquet_cli(tmp_path, subprocess_env, repo_root):
    images = [{"bytes": image_bytes(i), "path": None} for i in range(3)]
    table = pa.table({"id": ["p0", "p1", "p2"], "image": images, "caption": ["one", "two", ""]})
    pq.write_table(table, tmp_path / "t.parquet")
    out = subprocess.run(
        [sys.executable, "-m", "data_pipeline.convert", "--format", "parquet", "--input", str(tmp_path / "t.parquet"),
         "--output", str(tmp_path / "out"), "--text-column", "caption", "--workers", "2"],
        capture_output=True, text=True, env=subprocess_env, cwd=repo_root, timeout=120,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert "wrote 2 samples" in out.stdout and "empty_text" in out.stdout
    rows = read_back(tmp_path / "out")
    assert [r["segments"][0]["image"] for r in rows] == [images[0]["bytes"], images[1]["bytes"]]
    assert [(r["id"], r["segments"][1]["text"]) for r in rows] == [("p0", "one"), ("p1", "two")]


def test_unknown_column_is_a_clear_error(tmp_path):
    pq.write_table(pa.table({"img": [b"x"], "text": ["t"]}), tmp_path / "t.parquet")
    with pytest.raises(ValueError, match="no column 'image'"):
        convert("parquet", [str(tmp_path / "t.parquet")], str(tmp_path / "out"))
