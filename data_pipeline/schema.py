"""The sample schema: one row per sample, an ordered list of text/image segments plus id, source and task.

A segment is `{"text": str | None, "image": bytes | None, "role": str | None}` with exactly one of text/image set;
image bytes are the encoded file as given (JPEG/PNG/WebP, never re-encoded). `role` is "user" or "assistant" for
chat samples and None otherwise.
"""

from __future__ import annotations

import pyarrow as pa

SCHEMA_VERSION = 1
TASKS = ("caption", "interleaved", "chat", "t2i", "text")
ROLES = ("user", "assistant")

SEGMENT_TYPE = pa.struct([("text", pa.string()), ("image", pa.binary()), ("role", pa.string())])
SAMPLE_SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("source", pa.string()),
        ("task", pa.string()),
        ("segments", pa.list_(SEGMENT_TYPE)),
    ],
    metadata={"ett_schema_version": str(SCHEMA_VERSION)},
)


def text_segment(text: str, role: str | None = None) -> dict:
    return {"text": text, "image": None, "role": role}


def image_segment(image: bytes, role: str | None = None) -> dict:
    return {"text": None, "image": image, "role": role}


def check_sample(sample: dict) -> None:
    """Raise ValueError naming the field when `sample` does not fit the schema or its task's rules."""
    for key in ("id", "source", "task", "segments"):
        if key not in sample:
            raise ValueError(f"sample is missing the field {key!r}")
    task, segments = sample["task"], sample["segments"]
    if task not in TASKS:
        raise ValueError(f"sample {sample['id']!r}: task {task!r} is not one of {TASKS}")
    if not segments:
        raise ValueError(f"sample {sample['id']!r}: no segments")
    for i, seg in enumerate(segments):
        if (seg.get("text") is None) == (seg.get("image") is None):
            raise ValueError(
                f"sample {sample['id']!r}: segment {i} must have exactly one of 'text' or 'image'"
            )
        if seg.get("role") is not None and seg["role"] not in ROLES:
            raise ValueError(
                f"sample {sample['id']!r}: segment {i} role {seg['role']!r} is not one of {ROLES}"
            )
    num_images = sum(seg.get("image") is not None for seg in segments)
    if task in ("caption", "t2i") and num_images != 1:
        raise ValueError(f"sample {sample['id']!r}: task {task!r} needs exactly one image, got {num_images}")
    if task == "text" and num_images:
        raise ValueError(f"sample {sample['id']!r}: task 'text' cannot have images")
    if task == "chat" and not any(seg.get("role") == "assistant" for seg in segments):
        raise ValueError(f"sample {sample['id']!r}: task 'chat' needs at least one assistant segment")
