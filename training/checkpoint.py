"""Sharded, atomic, verified checkpoints: DeepSpeed's ZeRO files plus our own state as JSON, written in the background.

Layout of `CKPT_ROOT` (one per stage, under the run directory):

    latest                      name of the newest published tag (written last, atomically)
    step00000040/               one published checkpoint
        zero_pp_rank_*_model_states.pt, *_optim_states.pt    DeepSpeed (model, optimizer, scheduler)
        trainer_state.json      step, consumed samples/tokens, stage, config fingerprint, world size
        rank_00000.json         per-rank RNG state (python, numpy, torch CPU, CUDA)
        COMPLETE                completion marker, with the size and crc32 of every other file of the tag
    tmp-step00000050/           a save in progress (or a crashed one): never loaded, reported, removed
    zero_to_fp32.py             DeepSpeed's consolidation script (works on every tag directory)

A save (`CheckpointManager.save`, every rank together) blocks only while `engine.save_checkpoint` runs with a
`BackgroundCheckpointEngine` in place of DeepSpeed's writer: each state dict it is handed is copied into host buffers
that training never touches, and a background thread per rank then hands the copies to DeepSpeed's own writer
(same files, same names) under `tmp-<tag>` and records each file's size and crc32. The main thread publishes at a
later step boundary (`poll`) or at the end (`wait`): once an all-reduce says every rank's writer finished, rank 0
writes COMPLETE, renames the directory to `<tag>` and replaces `latest`. A new save first waits for the previous one.
A crash or kill at any point before that leaves the previous checkpoint as the newest published one.
Resuming verifies every recorded file (each rank reads a share, the ranks agree by all-reduce) before anything is
loaded: `--resume auto` skips a damaged checkpoint with a warning, an explicit path to one is an error.
Our own state is plain JSON, so loading it runs no pickle.
"""

from __future__ import annotations

import base64
import contextlib
import copy
import json
import os
import random
import shutil
import threading
import time
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from training.engine import all_reduce_host
from training.run_log import get_logger

COMPLETE_MARKER = "COMPLETE"
TRAINER_STATE = "trainer_state.json"
TMP_PREFIX = "tmp-"
TAG_PREFIX = "step"
WRITER_RECORDS = "files_rank_{rank:05d}.json"  # a rank's background-written files; merged into COMPLETE
READ_CHUNK = 16 << 20


class CheckpointError(RuntimeError):
    """A checkpoint cannot be used; the message names the directory and what is wrong."""


def tag_for_step(step: int) -> str:
    return f"{TAG_PREFIX}{step:08d}"


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def _barrier() -> None:
    if _distributed():
        dist.barrier()


def file_record(path: Path) -> dict:
    """The size and crc32 of the file at `path`, as COMPLETE records them."""
    crc, size, chunk = 0, 0, bytearray(READ_CHUNK)
    view = memoryview(chunk)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(chunk):
            crc = zlib.crc32(view[:n], crc)
            size += n
    return {"bytes": size, "crc32": f"{crc:08x}"}


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
    """`none` -> None; `auto` -> newest complete tag under `root` that passes `verify` (None if there is no
    complete tag; damaged ones are skipped with a warning); a path -> that tag directory (or the newest complete tag
    of that root), which must pass `verify`. Incomplete directories are never used. Every rank calls this together."""
    if resume == "none":
        return None
    if resume == "auto":
        report_incomplete(root)
        tags = list_complete(root)
        for tag in reversed(tags):
            problem = verify(root / tag)
            if problem is None:
                return _load_point(root, tag)
            get_logger(_rank()).warning(
                f"--resume auto: skipping the damaged checkpoint {root / tag}: {problem}"
            )
        if tags:
            raise CheckpointError(
                f"--resume auto: every complete checkpoint in {root} failed verification: {tags}"
            )
        return None
    path = Path(resume)
    if not path.exists():
        raise CheckpointError(f"--resume {resume}: no such checkpoint directory")
    if (path / TRAINER_STATE).exists() or path.name.startswith((TAG_PREFIX, TMP_PREFIX)):
        if not is_complete(path):
            raise CheckpointError(
                f"--resume {resume}: checkpoint is incomplete (no {COMPLETE_MARKER} marker); a save was interrupted. "
                f"Complete checkpoints in {path.parent}: {list_complete(path.parent) or 'none'}"
            )
        root, tag = path.parent, path.name
    else:
        tags = list_complete(path)
        if not tags:
            raise CheckpointError(f"--resume {resume}: no complete checkpoint in this directory")
        root, tag = path, tags[-1]
    problem = verify(root / tag)
    if problem is not None:
        raise CheckpointError(f"--resume {resume}: damaged checkpoint: {problem}")
    return _load_point(root, tag)


def _rank() -> int:
    return dist.get_rank() if _distributed() else 0


FILE_PROBLEMS = {
    1: "missing",
    2: "cannot be read",
    3: "size differs from the recorded {bytes} bytes (truncated or overwritten)",
    4: "crc32 differs from the recorded {crc32} (the contents changed after the save)",
}


def verify(tag_dir: Path) -> str | None:
    """Check every file COMPLETE records in `tag_dir` (size, then crc32) before anything is loaded. Every rank calls
    this together and reads its share of the bytes; one all-reduce makes the answer the same on every rank: None if
    intact, else `<file>: <what is wrong>` for the first bad file by name."""
    marker = tag_dir / COMPLETE_MARKER
    try:
        records = json.loads(marker.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        return f"{marker}: not a readable completion marker ({type(exc).__name__})"
    if not isinstance(records, dict):
        return f"{marker}: not a completion marker (expected a JSON object)"
    if "files" not in records:
        get_logger(_rank()).warning(f"{tag_dir}: written without file checksums; loaded unverified")
        return None
    files = records["files"]
    if not isinstance(files, dict) or not all(
        isinstance(r, dict) and isinstance(r.get("bytes"), int) and isinstance(r.get("crc32"), str)
        for r in files.values()
    ):
        return f"{marker}: 'files' is not a map of file name to {{bytes, crc32}}"
    names = sorted(files)
    world, rank = (dist.get_world_size(), dist.get_rank()) if _distributed() else (1, 0)
    # Greedy by size: each file to the rank with the fewest bytes so far, the same assignment on every rank.
    load, owner = [0] * world, {}
    for name in sorted(names, key=lambda n: (-files[n]["bytes"], n)):
        owner[name] = min(range(world), key=load.__getitem__)
        load[owner[name]] += files[name]["bytes"]
    codes = torch.zeros(len(names), dtype=torch.int32)
    for i, name in enumerate(names):
        if owner[name] == rank:
            codes[i] = _check_file(tag_dir / name, files[name])
    all_reduce_host(codes, op=dist.ReduceOp.MAX)
    bad = [i for i, code in enumerate(codes.tolist()) if code]
    if not bad:
        return None
    name = names[bad[0]]
    return f"{tag_dir / name}: " + FILE_PROBLEMS[int(codes[bad[0]])].format(**files[name])


def _check_file(path: Path, record: dict) -> int:
    """0 if the file at `path` matches `record`, else its FILE_PROBLEMS code."""
    if not path.is_file():
        return 1
    try:
        if path.stat().st_size != record["bytes"]:
            return 3
        return 0 if file_record(path) == record else 4
    except OSError:
        return 2


def _load_point(root: Path, tag: str) -> ResumePoint:
    state = json.loads((root / tag / TRAINER_STATE).read_text())
    return ResumePoint(root=root, tag=tag, trainer_state=state)


class HostSnapshot:
    """Copies of state dicts whose tensors live in host buffers that training never touches. Storages are copied
    whole and views rebuilt on them, so `torch.save` writes exactly what it would have written from the originals.
    The buffers are kept for the next save after `recycle` (faulting in fresh memory costs about 4x the copy)."""

    def __init__(self) -> None:
        self.free: dict[tuple[int, bool], list[torch.Tensor]] = {}
        self.used: list[torch.Tensor] = []

    def recycle(self) -> None:
        """Make the buffers of the previous snapshots reusable (their writes must have finished)."""
        for buffer in self.used:
            self.free.setdefault((buffer.numel(), buffer.is_pinned()), []).append(buffer)
        self.used = []

    def copy(self, state):
        """`state` with every container and tensor copied (shared references stay shared, so the pickle is the
        same) and every tensor storage copied into a host buffer."""
        memo: dict = {}
        state = self._copy(state, memo)
        if any(isinstance(key, tuple) and key[0].type == "cuda" for key in memo):
            torch.cuda.synchronize()
        return state

    def _copy(self, obj, memo: dict):
        if id(obj) in memo:
            return memo[id(obj)]
        if isinstance(obj, torch.Tensor):
            out = self._copy_tensor(obj, memo)
        elif isinstance(obj, dict):
            out = copy.copy(obj)
            for key, value in obj.items():
                out[key] = self._copy(value, memo)
        elif isinstance(obj, list):
            out = [self._copy(v, memo) for v in obj]
        elif isinstance(obj, tuple):
            items = [self._copy(v, memo) for v in obj]
            out = type(obj)(*items) if hasattr(obj, "_fields") else type(obj)(items)
        else:
            return obj
        memo[id(obj)] = out
        return out

    def _copy_tensor(self, tensor: torch.Tensor, memo: dict) -> torch.Tensor:
        storage = tensor.untyped_storage()
        key = (tensor.device, storage.data_ptr() if storage.nbytes() else id(tensor))
        host = memo.get(key)
        if host is None:
            host = self._buffer(storage.nbytes(), pinned=tensor.device.type == "cuda")
            host.copy_(
                torch.empty(0, dtype=torch.uint8, device=tensor.device).set_(storage), non_blocking=True
            )
            memo[key] = host
        out = torch.empty(0, dtype=tensor.dtype).set_(
            host.untyped_storage(), tensor.storage_offset(), tensor.size(), tensor.stride()
        )
        if isinstance(tensor, torch.nn.Parameter):
            out = torch.nn.Parameter(out, requires_grad=tensor.requires_grad)
        else:
            out.requires_grad_(tensor.requires_grad)
        if tensor.__dict__:  # Python attributes (DeepSpeed's ds_id, ...) are pickled with the tensor
            out.__dict__.update(self._copy(tensor.__dict__, memo))
        return out

    def _buffer(self, nbytes: int, pinned: bool) -> torch.Tensor:
        reusable = self.free.get((nbytes, pinned))
        buffer = reusable.pop() if reusable else torch.empty(nbytes, dtype=torch.uint8, pin_memory=pinned)
        self.used.append(buffer)
        return buffer


class BackgroundCheckpointEngine:
    """DeepSpeed's checkpoint-engine interface (deepspeed.runtime.checkpoint_engine.CheckpointEngine) around the
    engine's own writer: inside `capturing()`, `save` only snapshots the state dict into host memory and queues it
    (a BackgroundWrite hands the snapshots to the wrapped writer later); outside it (e.g. `save_16bit_model`) it
    writes at once, as before. Everything else (load, commit, ...) is the wrapped engine's. DeepSpeed's
    DecoupledCheckpointEngine does not fit: it shares the live tensors with its writer process and waits for the
    writes at the next optimizer step."""

    def __init__(self, inner) -> None:
        if inner.is_decoupled():
            raise CheckpointError(
                f"DeepSpeed's {inner.name} (checkpoint.writer.decoupled in the DeepSpeed config) is not supported: "
                "training/checkpoint.py already writes checkpoints in the background"
            )
        self.inner = inner
        self.queued: list[tuple[object, str]] | None = None
        self.host = HostSnapshot()

    def __getattr__(self, name: str):
        return getattr(self.inner, name)

    def save(self, state_dict, path: str) -> None:
        if self.queued is None:
            self.inner.save(state_dict, path)
        else:
            self.queued.append((self.host.copy(state_dict), path))

    @contextlib.contextmanager
    def capturing(self):
        """Queue the saves made inside the block (snapshots of their state, in host buffers); yields the queue."""
        self.queued = []
        try:
            yield self.queued
        finally:
            self.queued = None


class BackgroundWrite:
    """One rank's part of a save, written by a daemon thread: each queued snapshot through DeepSpeed's writer, then
    WRITER_RECORDS (the size and crc32 of each file) in the tag directory. A failure is kept in `error`."""

    def __init__(self, step: int, tmp_dir: Path, rank: int, writer, queued: list) -> None:
        self.step, self.tag, self.tmp_dir, self.rank = step, tag_for_step(step), tmp_dir, rank
        self.error: str | None = None
        self.thread = threading.Thread(
            target=self._write, args=(writer, queued), name=f"checkpoint-{self.tag}", daemon=True
        )
        self.thread.start()

    def _write(self, writer, queued: list) -> None:
        try:
            records = {}
            while queued:
                state, path = queued.pop(0)
                writer.save(state, path)
                del state
                records[Path(path).relative_to(self.tmp_dir).as_posix()] = file_record(Path(path))
            _atomic_write_text(self.tmp_dir / WRITER_RECORDS.format(rank=self.rank), json.dumps(records))
        except Exception as exc:
            self.error = f"{type(exc).__name__}: {exc}"

    @property
    def done(self) -> bool:
        return not self.thread.is_alive()


class CheckpointManager:
    """Saves, publishes and prunes the checkpoints of one stage under `root`. Every rank calls `save`, `poll` and
    `wait` together (`poll` and `wait` run one all-reduce while a save is in flight, nothing otherwise)."""

    def __init__(self, root: str | Path, rank: int, world_size: int, keep_last: int = 2) -> None:
        self.root = Path(root)
        self.rank = rank
        self.world_size = world_size
        self.keep_last = keep_last
        self.pending: BackgroundWrite | None = None

    def save(self, engine, step: int, trainer_state: dict, rank_state: dict, rank0_extra=None) -> Path:
        """Start checkpoint `step`: waits for the previous save, then blocks only while the state is copied to host
        memory; the shards are written in the background and published by a later `poll` or `wait`.
        `trainer_state` is rank 0's global state; `rank_state` is this rank's own (RNG, data reader);
        `rank0_extra(dir)` writes additional files (e.g. the replicated discriminator) into the checkpoint.
        Returns the directory the checkpoint will be published as."""
        self.wait()
        tag = tag_for_step(step)
        tmp_tag = TMP_PREFIX + tag
        tmp_dir = self.root / tmp_tag
        if self.rank == 0:
            self.root.mkdir(parents=True, exist_ok=True)
            if tmp_dir.exists():
                shutil.rmtree(tmp_dir)
        _barrier()
        if not isinstance(engine.checkpoint_engine, BackgroundCheckpointEngine):
            engine.checkpoint_engine = BackgroundCheckpointEngine(engine.checkpoint_engine)
        background = engine.checkpoint_engine
        background.host.recycle()
        with background.capturing() as queued:
            engine.save_checkpoint(
                str(self.root), tag=tmp_tag, client_state={"ett_step": step}, save_latest=False
            )
        (tmp_dir / f"rank_{self.rank:05d}.json").write_text(json.dumps(rank_state))
        if self.rank == 0:
            if rank0_extra is not None:
                rank0_extra(tmp_dir)
            state = dict(trainer_state, step=step, world_size=self.world_size, tag=tag, saved_at=time.time())
            (tmp_dir / TRAINER_STATE).write_text(json.dumps(state, indent=1))
        self.pending = BackgroundWrite(step, tmp_dir, self.rank, background.inner, queued)
        return self.root / tag

    def poll(self) -> Path | None:
        """At a step boundary: publish the save in flight if every rank's background write has finished. Returns
        the published directory, or None."""
        if self.pending is None:
            return None
        pending = self.pending
        flags = torch.tensor([0 if pending.done else 1, 1 if pending.error else 0], dtype=torch.int32)
        not_done, failed = all_reduce_host(flags, op=dist.ReduceOp.MAX).tolist()
        if failed:
            self.pending = None
            where = (
                f"on rank {self.rank}: {pending.error}" if pending.error else "on another rank (see its log)"
            )
            raise CheckpointError(f"{pending.tmp_dir}: writing checkpoint {pending.tag} failed {where}")
        if not_done:
            return None
        self.pending = None
        final_dir = self.root / pending.tag
        if self.rank == 0:
            self._publish(pending, final_dir)
            get_logger(self.rank).info(f"published checkpoint {final_dir}")
        return final_dir

    def wait(self) -> Path | None:
        """Block until the save in flight (if any) is written and published on every rank; returns its directory."""
        if self.pending is None:
            return None
        self.pending.thread.join()
        final_dir = self.poll()
        _barrier()
        return final_dir

    def _publish(self, pending: BackgroundWrite, final_dir: Path) -> None:
        """Rank 0, once every writer finished: COMPLETE with the size and crc32 of every file (the writers' records;
        rank 0 reads the small files written directly), then the rename and `latest`."""
        tmp_dir = pending.tmp_dir
        files: dict[str, dict] = {}
        for rank in range(self.world_size):
            records = tmp_dir / WRITER_RECORDS.format(rank=rank)
            files.update(json.loads(records.read_text()))
            records.unlink()
        for path in sorted(tmp_dir.rglob("*")):
            name = path.relative_to(tmp_dir).as_posix()
            if path.is_file() and name not in files:
                files[name] = file_record(path)
        marker = {"step": pending.step, "world_size": self.world_size, "files": dict(sorted(files.items()))}
        (tmp_dir / COMPLETE_MARKER).write_text(json.dumps(marker, indent=1))
        if final_dir.exists():
            shutil.rmtree(final_dir)
        os.replace(tmp_dir, final_dir)
        _atomic_write_text(self.root / "latest", final_dir.name)
        self._prune()

    def _prune(self) -> None:
        tags = list_complete(self.root)
        for old in tags[: max(0, len(tags) - self.keep_last)]:
            shutil.rmtree(self.root / old, ignore_errors=True)
        for path in self.root.iterdir():
            if path.is_dir() and path.name.startswith(TMP_PREFIX):
                shutil.rmtree(path, ignore_errors=True)
