"""Sharded, atomic checkpoints: DeepSpeed's ZeRO files plus our own state as JSON.

Layout of `CKPT_ROOT` (one per stage, under the run directory):

    latest                      name of the newest complete tag (written last, atomically)
    step00000040/               one complete checkpoint
        zero_pp_rank_*_model_states.pt, *_optim_states.pt    DeepSpeed (model, optimizer, scheduler)
        trainer_state.json      step, consumed samples/tokens, stage, config fingerprint, world size
        rank_00000.json         per-rank RNG state (python, numpy, torch CPU, CUDA)
        COMPLETE                completion marker: written only after every rank finished writing
    tmp-step00000050/           a save in progress (or a crashed one): never loaded, reported, removed
    zero_to_fp32.py             DeepSpeed's consolidation script (works on every tag directory)

A save writes everything under `tmp-<tag>`, waits for every rank, then rank 0 writes COMPLETE, renames the
directory to `<tag>` and replaces `latest`. A crash at any point leaves the previous checkpoint as it was.
Our own state is plain JSON, so loading it runs no pickle.
"""

from __future__ import annotations

import base64
import json
import os
import random
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from training.run_log import get_logger

COMPLETE_MARKER = "COMPLETE"
TRAINER_STATE = "trainer_state.json"
TMP_PREFIX = "tmp-"
TAG_PREFIX = "step"


class CheckpointError(RuntimeError):
    """A checkpoint cannot be used; the message names the directory and what is wrong."""


def tag_for_step(step: int) -> str:
    return f"{TAG_PREFIX}{step:08d}"


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def capture_rng_state() -> dict:
    """This process's RNG states as JSON-serialisable data (python, numpy, torch CPU and CUDA)."""
    np_state = np.random.get_state()
    state = {
        "python": [random.getstate()[0], list(random.getstate()[1]), random.getstate()[2]],
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
        "torch_cpu": base64.b64encode(torch.get_rng_state().numpy().tobytes()).decode(),
    }
    if torch.cuda.is_available():
        state["torch_cuda"] = [
            base64.b64encode(s.numpy().tobytes()).decode() for s in torch.cuda.get_rng_state_all()
        ]
    return state


def restore_rng_state(state: dict) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(torch.frombuffer(bytearray(base64.b64decode(state["torch_cpu"])), dtype=torch.uint8))
    if "torch_cuda" in state and torch.cuda.is_available():
        cuda_states = [
            torch.frombuffer(bytearray(base64.b64decode(s)), dtype=torch.uint8) for s in state["torch_cuda"]
        ]
        torch.cuda.set_rng_state_all(cuda_states[: torch.cuda.device_count()])


@dataclass
class ResumePoint:
    """A complete checkpoint to resume from."""

    root: Path
    tag: str
    trainer_state: dict

    @property
    def path(self) -> Path:
        return self.root / self.tag

    def rank_state(self, rank: int) -> dict | None:
        path = self.path / f"rank_{rank:05d}.json"
        return json.loads(path.read_text()) if path.exists() else None


def is_complete(tag_dir: Path) -> bool:
    return (tag_dir / COMPLETE_MARKER).is_file() and (tag_dir / TRAINER_STATE).is_file()


def list_complete(root: Path) -> list[str]:
    """Complete tags under `root`, oldest first."""
    if not root.is_dir():
        return []
    tags = [p.name for p in root.iterdir() if p.is_dir() and p.name.startswith(TAG_PREFIX) and is_complete(p)]
    return sorted(tags)


def report_incomplete(root: Path) -> list[str]:
    """Names of directories under `root` that look like checkpoints but lack the completion marker."""
    if not root.is_dir():
        return []
    bad = [
        p.name
        for p in root.iterdir()
        if p.is_dir()
        and (p.name.startswith(TMP_PREFIX) or (p.name.startswith(TAG_PREFIX) and not is_complete(p)))
    ]
    if bad:
        get_logger().warning(
            f"ignoring incomplete checkpoint directories in {root} (no {COMPLETE_MARKER} marker): {bad}"
        )
    return bad


def resolve_resume(resume: str, root: Path) -> ResumePoint | None:
    """`none` -> None; `auto` -> newest complete tag under `root` (None if there is none);
    a path -> that tag directory (or the newest complete tag of that root). Incomplete directories are never used."""
    if resume == "none":
        return None
    if resume == "auto":
        report_incomplete(root)
        tags = list_complete(root)
        if not tags:
            return None
        return _load_point(root, tags[-1])
    path = Path(resume)
    if not path.exists():
        raise CheckpointError(f"--resume {resume}: no such checkpoint directory")
    if (path / TRAINER_STATE).exists() or path.name.startswith((TAG_PREFIX, TMP_PREFIX)):
        if not is_complete(path):
            raise CheckpointError(
                f"--resume {resume}: checkpoint is incomplete (no {COMPLETE_MARKER} marker); a save was interrupted. "
                f"Complete checkpoints in {path.parent}: {list_complete(path.parent) or 'none'}"
            )
        return _load_point(path.parent, path.name)
    tags = list_complete(path)
    if not tags:
        raise CheckpointError(f"--resume {resume}: no complete checkpoint in this directory")
    return _load_point(path, tags[-1])


def _load_point(root: Path, tag: str) -> ResumePoint:
    state = json.loads((root / tag / TRAINER_STATE).read_text())
    return ResumePoint(root=root, tag=tag, trainer_state=state)


class CheckpointManager:
    """Saves and prunes checkpoints of one stage under `root`; every rank calls `save` together."""

    def __init__(self, root: str | Path, rank: int, world_size: int, keep_last: int = 2) -> None:
        self.root = Path(root)
        self.rank = rank
        self.world_size = world_size
        self.keep_last = keep_last

    def save(self, engine, step: int, trainer_state: dict, rank_state: dict, rank0_extra=None) -> Path:
        """Write checkpoint `step` atomically. `trainer_state` is rank 0's global state; `rank_state` is this
        rank's own (RNG, data reader); `rank0_extra(dir)` writes additional files (e.g. the replicated
        discriminator) into the checkpoint before it is published. Returns the published directory."""
        tag = tag_for_step(step)
        tmp_tag = TMP_PREFIX + tag
        tmp_dir = self.root / tmp_tag
        if self.rank == 0:
            self.root.mkdir(parents=True, exist_ok=True)
            if tmp_dir.exists():
                shutil.rmtree(tmp_dir)
        _barrier()
        engine.save_checkpoint(
            str(self.root), tag=tmp_tag, client_state={"ett_step": step}, save_latest=False
        )
        (tmp_dir / f"rank_{self.rank:05d}.json").write_text(json.dumps(rank_state))
        _barrier()
        final_dir = self.root / tag
        if self.rank == 0:
            if rank0_extra is not None:
                rank0_extra(tmp_dir)
            state = dict(trainer_state, step=step, world_size=self.world_size, tag=tag, saved_at=time.time())
            (tmp_dir / TRAINER_STATE).write_text(json.dumps(state, indent=1))
            (tmp_dir / COMPLETE_MARKER).write_text(json.dumps({"step": step, "world_size": self.world_size}))
            if final_dir.exists():
                shutil.rmtree(final_dir)
            os.replace(tmp_dir, final_dir)
            _atomic_write_text(self.root / "latest", tag)
            self._prune()
        _barrier()
        return final_dir

    def _prune(self) -> None:
        tags = list_complete(self.root)
        for old in tags[: max(0, len(tags) - self.keep_last)]:
            shutil.rmtree(self.root / old, ignore_errors=True)
        for path in self.root.iterdir():
            if path.is_dir() and path.name.startswith(TMP_PREFIX):
                shutil.rmtree(path, ignore_errors=True)
