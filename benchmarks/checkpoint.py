"""Checkpoint benchmark: the save (its blocking part and until published), verification, load into a fresh engine,
and the Hugging Face export, on one process.

    python -m benchmarks.checkpoint [--size small|default] [--json OUT] [--save-repeats 3] [--max-shard-size 5GB]
                                    [--workdir DIR] [--keep]

What runs (every phase in its own child process, so each starts fresh and its peak RSS is its own, read with
os.wait4):
  data     the synthetic dataset and its sentencepiece tokenizer (data_pipeline.synthetic), a few dozen samples;
  save     an ETT stage-2 engine built by training.trainer.Trainer (TrainConfig dataclasses, deepspeed.zero.Init,
           ZeRO-3 from ds_configs/zero3.json, torch AdamW, the replicated discriminator, the streaming loader;
           one process, gloo, fp32), ONE real training step (so the Adam moments are populated), then
           --save-repeats timed saves (medians of the repeats after the first): `Trainer.save`, the blocking
           part (the state copied into host buffers, the small files written; training would go on from here), then
           `CheckpointManager.wait`, i.e. until the background write (DeepSpeed shards, crc32 of every file) is
           finished and the checkpoint published (COMPLETE, rename, `latest`): the total. The first save also
           allocates the host buffers that later saves reuse, so it is reported on its own. The files are in the
           page cache when the save is published (nothing calls fsync); the os.sync() that follows is timed
           separately. Digests (sha256) of every weight, of the fp32 optimizer partitions and
           Adam moments, and of the RNG state are written next to the checkpoint;
  load     the timed verification (`training.checkpoint.verify`: the size and crc32 of every file COMPLETE
           records, one rank reads them all), then a fresh engine built the same way but from a different seed (so
           its weights differ before the load), then the timed resume path of the Trainer: resolve_resume (which
           verifies again), `engine.load_checkpoint`, the loader state, the RNG state and the discriminator. It
           checks that every weight, optimizer partition and Adam moment is bitwise equal to the saved one
           (`weights_match`, `optimizer_state_match`);
  baseline the same export command on a checkpoint of the tiny (`small`) model (at `--size small`, the export
           itself): the interpreter, the modules the export imports (torch, deepspeed, transformers, and what
           they load lazily: dynamo, sympy, triton, ...) and its fixed costs, i.e. the process's RSS and wall time
           when the model itself costs nothing;
  export   `python -m training.export --checkpoint RUN/checkpoints --out EXPORT`: wall time and peak RSS of that
           process, compared with one fp32 copy of the model (export.py's docstring: at most one full-precision
           copy plus one safetensors shard, on top of the baseline).

Sizes: `default` is an ETT model whose LLM has ~128M parameters (Qwen2-style, 12 layers, hidden 768, GQA 12/4,
vocab 32000, tied; ~0.5 GB of fp32 weights) plus a ~5M-parameter IBQ tokenizer (16384 codes), a 0.6M projector and a 0.7M discriminator;
`small` is the tests' tiny model (seconds). The checkpoint is written to a temporary directory (or --workdir)
on the same disk, and read back while it is still in the page cache: the load and export numbers are warm-cache
numbers. Prints a table and writes JSON (default benchmarks/results/checkpoint.json) with the machine, versions,
date and git commit.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path

from benchmarks.provenance import REPO_ROOT, cpu_model, git

DEFAULT_JSON = REPO_ROOT / "benchmarks" / "results" / "checkpoint.json"
BLOCKING_SAVE_TARGET_S = 1.0
PROGRESS_FD_ENV = "ETT_BENCH_PROGRESS_FD"

SIZES = {
    "small": {
        "llm": dict(vocab_size=256, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
                    intermediate_size=64, max_position_embeddings=256),
        "tokenizer": dict(base_channels=8, channel_mult=(1, 1, 2, 2), norm_groups=4, z_channels=16, code_dim=16,
                          codebook_size=32),
        "loss": dict(gan_weight=0.1, disc_ndf=8, disc_layers=2),
        "image_size": (24, 48),
        "seq_len": 96,
        "num_train": 40,
    },
    "default": {
        "llm": dict(vocab_size=32000, hidden_size=768, num_layers=12, num_heads=12, num_kv_heads=4,
                    intermediate_size=3072, max_position_embeddings=2048),
        "tokenizer": dict(base_channels=64, channel_mult=(1, 1, 2, 2), norm_groups=32, z_channels=64, code_dim=64,
                          codebook_size=16384, num_res_blocks=1),
        "loss": dict(gan_weight=0.1, disc_ndf=32, disc_layers=3),
        "image_size": (32, 64),
        "seq_len": 128,
        "num_train": 40,
    },
}  # fmt: skip

# ----------------------------------------------------------------------------------------------- child phases


def progress(message: str) -> None:
    """A progress line on the parent's stdout (the child's own stdout/stderr go to its log file)."""
    fd = os.environ.get(PROGRESS_FD_ENV)
    line = f"  [{time.strftime('%H:%M:%S')}] {message}\n"
    if fd is None:
        sys.stdout.write(line)
        sys.stdout.flush()
    else:
        os.write(int(fd), line.encode())


def make_config(size: str, work: Path):
    """The stage-2 (ETT) TrainConfig of this benchmark, built from the training dataclasses (not validated:
    a fresh ETT stage normally starts from a hand-off, which this benchmark does not need)."""
    from modeling.llm import LLMConfig
    from modeling.tokenizer import TokenizerConfig
    from modeling.tokenizer.config import VQLossConfig
    from training.run_config import (
        CheckpointConfig,
        DataConfig,
        DatasetSpec,
        ModelConfig,
        OptimConfig,
        ScheduleConfig,
        StageConfig,
        TrainConfig,
        TrainLoopConfig,
    )

    spec = SIZES[size]
    data = work / "data"
    return TrainConfig(
        stage=StageConfig(name="bench_ett", kind="ett"),
        model=ModelConfig(
            llm=LLMConfig(**spec["llm"]),
            tokenizer=TokenizerConfig(**spec["tokenizer"], loss=VQLossConfig(**spec["loss"])),
        ),
        data=DataConfig(
            train=[DatasetSpec(path=str(data / "caption_train"))],
            text_tokenizer=str(data / "tokenizer"),
            image_size=spec["image_size"],
            seq_len=spec["seq_len"],
        ),
        optim=OptimConfig(lr=1e-4),
        schedule=ScheduleConfig(max_steps=10, warmup_ratio=0.0, kind="constant"),
        train=TrainLoopConfig(
            global_batch_size=1,
            micro_batch_size=1,
            precision="fp32",
            output_dir=str(work / "run"),
            progress=False,
        ),
        checkpoint=CheckpointConfig(keep_last=2),
    )


def _digest(tensor) -> str:
    import torch

    flat = tensor.detach().to("cpu").contiguous().reshape(-1)
    data = flat.view(torch.uint8).numpy() if flat.numel() else b""
    return (
        f"{str(tensor.dtype).removeprefix('torch.')}{list(tensor.shape)}:{hashlib.sha256(data).hexdigest()}"
    )


def weight_digests(engine, rank: int) -> dict[str, str]:
    """sha256 of every parameter and persistent buffer of the (ZeRO-3 partitioned) model, gathered module by module."""
    from training.engine import gather_full_state_dict

    return {name: _digest(t) for name, t in gather_full_state_dict(engine.module, rank).items()}


def optimizer_digests(engine) -> dict[str, str]:
    """sha256 of ZeRO-3's fp32 master partitions and of the optimizer state attached to them (Adam moments)."""
    import torch

    opt = engine.optimizer
    out = {}
    for i, flat in enumerate(getattr(opt, "fp32_partitioned_groups_flat", [])):
        out[f"group{i}/fp32_master"] = _digest(flat)
        for key, value in opt.optimizer.state.get(flat, {}).items():
            out[f"group{i}/{key}"] = _digest(value) if torch.is_tensor(value) else repr(value)
    return out


def discriminator_digests(disc_state) -> dict[str, str]:
    if disc_state is None:
        return {}
    return {f"discriminator.{k}": _digest(v) for k, v in disc_state.discriminator.state_dict().items()}


def parameter_counts(model) -> dict[str, int]:
    counts: dict[str, int] = {}
    for name, param in model.named_parameters():
        numel = int(getattr(param, "ds_numel", param.numel()))
        counts[name.split(".", 1)[0]] = counts.get(name.split(".", 1)[0], 0) + numel
    counts["total"] = sum(counts.values())
    return counts


def phase_save(work: Path, size: str, repeats: int = 1) -> dict:
    import torch

    from training import checkpoint as ckpt
    from training.trainer import Trainer

    cfg = make_config(size, work)
    progress("save: building the ZeRO-3 engine (deepspeed.zero.Init, AdamW, discriminator, loader)")
    start = time.perf_counter()
    trainer = Trainer(cfg)
    trainer.setup("none")
    build_s = time.perf_counter() - start
    engine, scheduler, disc_state, rank = (
        trainer.engine,
        trainer.scheduler,
        trainer.discriminator,
        trainer.rank,
    )
    disc = disc_state.discriminator if disc_state is not None else None
    counts = parameter_counts(engine.module)
    progress(f"save: one training step ({counts['total'] / 1e6:.1f}M parameters)")
    start = time.perf_counter()
    engine.train()
    loss = trainer.train_step()["loss/total"]
    step_s = time.perf_counter() - start
    save_times, total_times = [], []
    for repeat in range(repeats):
        # Later repeats save the same state under the next step's tag, as a run saving every step would (and
        # prune, keep_last=2). os.sync() first so that no earlier save's dirty pages are being written back.
        if repeat:
            trainer.state.step += 1
        os.sync()
        progress(f"save: Trainer.save + background write until published (timed, {repeat + 1}/{repeats})")
        start = time.perf_counter()
        trainer.save()
        save_times.append(time.perf_counter() - start)
        path = trainer.checkpoints.wait()
        total_times.append(time.perf_counter() - start)
    start = time.perf_counter()
    os.sync()
    sync_s = time.perf_counter() - start
    step = trainer.state.step

    progress("save: hashing the saved weights and optimizer state")
    digests = {
        "weights": weight_digests(engine, rank),
        "optimizer": optimizer_digests(engine),
        "discriminator": discriminator_digests(disc_state),
        "rng": hashlib.sha256(json.dumps(ckpt.capture_rng_state(), sort_keys=True).encode()).hexdigest(),
        "scheduler_last_epoch": scheduler.last_epoch,
        "step": step,
    }
    (work / "saved_digests.json").write_text(json.dumps(digests))
    return {
        "checkpoint_dir": str(path),
        "engine_build_seconds": build_s,
        "train_step_seconds": step_s,
        "train_step_loss": loss,
        "save_seconds": statistics.median(save_times[1:] or save_times),
        "save_seconds_all": save_times,
        "save_total_seconds": statistics.median(total_times[1:] or total_times),
        "save_total_seconds_all": total_times,
        "sync_after_save_seconds": sync_s,
        "parameters": counts,
        "trainable_parameters": int(
            sum(int(getattr(p, "ds_numel", p.numel())) for p in engine.module.parameters() if p.requires_grad)
        ),
        "discriminator_parameters": int(sum(p.numel() for p in disc.parameters())) if disc is not None else 0,
        "torch_threads": torch.get_num_threads(),
        "optimizer_tensors": len(digests["optimizer"]),
    }


def phase_load(work: Path, size: str) -> dict:
    from training import checkpoint as ckpt
    from training.engine import build_ds_config
    from training.trainer import Trainer

    cfg = make_config(size, work)
    saved = json.loads((work / "saved_digests.json").read_text())
    progress("load: building a fresh ZeRO-3 engine from a different seed")
    start = time.perf_counter()
    trainer = Trainer(cfg)
    trainer.build(build_ds_config(cfg, trainer.world_size), fresh=True, seed=cfg.train.seed + 1)
    build_s = time.perf_counter() - start
    engine, scheduler, disc_state, rank = (
        trainer.engine,
        trainer.scheduler,
        trainer.discriminator,
        trainer.rank,
    )
    before = weight_digests(engine, rank)
    differing_before = sum(before[k] != saved["weights"].get(k) for k in before)

    root = work / "run" / "checkpoints"
    tag_dir = root / ckpt.list_complete(root)[-1]
    progress(f"load: verify {tag_dir.name} (size and crc32 of every file, timed)")
    start = time.perf_counter()
    problem = ckpt.verify(tag_dir)
    verify_s = time.perf_counter() - start
    verified_bytes = sum(p.stat().st_size for p in tag_dir.iterdir() if p.name != ckpt.COMPLETE_MARKER)

    progress("load: resolve_resume (verifies again) + engine.load_checkpoint + trainer state (timed)")
    start = time.perf_counter()
    point = trainer.resume_point("auto")
    if point is None:
        raise RuntimeError(f"no complete checkpoint under {work / 'run' / 'checkpoints'}")
    engine.load_checkpoint(str(point.root), tag=point.tag, load_module_strict=True)
    engine_s = time.perf_counter() - start
    trainer.state.load(point, rank, same_world=True)
    state = point.trainer_state
    load_s = time.perf_counter() - start

    progress("load: comparing weights and optimizer state with the saved ones")
    after = weight_digests(engine, rank)
    optimizer = optimizer_digests(engine)
    mismatched = sorted(
        k for k in set(after) | set(saved["weights"]) if after.get(k) != saved["weights"].get(k)
    )
    opt_mismatched = sorted(
        k for k in set(optimizer) | set(saved["optimizer"]) if optimizer.get(k) != saved["optimizer"].get(k)
    )
    disc_mismatched = sorted(
        k for k, v in discriminator_digests(disc_state).items() if saved["discriminator"].get(k) != v
    )
    rng = hashlib.sha256(json.dumps(ckpt.capture_rng_state(), sort_keys=True).encode()).hexdigest()
    return {
        "engine_build_seconds": build_s,
        "verify_seconds": verify_s,
        "verified_bytes": verified_bytes,
        "verify_problem": problem,
        "load_seconds": load_s,
        "engine_load_checkpoint_seconds": engine_s,
        "trainer_state_seconds": load_s - engine_s,
        "step": state["step"],
        "weights_compared": len(after),
        "weights_differing_before_load": differing_before,
        "weights_match": not mismatched and len(after) == len(saved["weights"]) > 0,
        "weights_mismatched": mismatched[:10],
        "optimizer_tensors_compared": len(optimizer),
        "optimizer_state_match": not opt_mismatched and len(optimizer) > 0,
        "optimizer_mismatched": opt_mismatched[:10],
        "discriminator_match": not disc_mismatched,
        "rng_match": rng == saved["rng"],
        "scheduler_match": scheduler.last_epoch == saved["scheduler_last_epoch"],
    }


# ----------------------------------------------------------------------------------------------- parent


def run_child(name: str, argv: list[str], work: Path) -> tuple[float, int]:
    """Run `argv` as a child with its output in WORK/NAME.log; returns (wall seconds, peak RSS bytes of that child
    alone, from os.wait4). On failure prints the log's tail and exits."""
    log_path = work / f"{name}.log"
    progress_fd = os.dup(sys.stdout.fileno())
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO_ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env[PROGRESS_FD_ENV] = str(progress_fd)
    sys.stdout.flush()
    try:
        with open(log_path, "w") as log:
            start = time.perf_counter()
            proc = subprocess.Popen(
                argv, cwd=REPO_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, pass_fds=(progress_fd,)
            )
            _, status, usage = os.wait4(proc.pid, 0)
            seconds = time.perf_counter() - start
            proc.returncode = os.waitstatus_to_exitcode(status)
    finally:
        os.close(progress_fd)
    if proc.returncode != 0:
        print(f"{name} failed with exit code {proc.returncode}; last lines of {log_path}:", file=sys.stderr)
        print(log_path.read_text()[-4000:], file=sys.stderr)
        raise SystemExit(1)
    return seconds, usage.ru_maxrss * 1024


def run_phase(phase: str, work: Path, size: str, save_repeats: int = 1) -> dict:
    argv = [sys.executable, "-m", "benchmarks.checkpoint", "--phase", phase, "--workdir", str(work), "--size", size,
            "--save-repeats", str(save_repeats)]  # fmt: skip
    seconds, rss = run_child(phase, argv, work)
    result = json.loads((work / f"result_{phase}.json").read_text())
    result.update(process_seconds=seconds, peak_rss_bytes=rss)
    return result


def export_command(checkpoint: Path, out: Path, max_shard_size: str) -> list[str]:
    return [sys.executable, "-m", "training.export", "--checkpoint", str(checkpoint), "--out", str(out),
            "--max-shard-size", max_shard_size]  # fmt: skip


def directory_bytes(path: Path) -> tuple[int, dict[str, int]]:
    files = {str(p.relative_to(path)): p.stat().st_size for p in sorted(path.rglob("*")) if p.is_file()}
    return sum(files.values()), files


def machine_info() -> dict:
    uname = platform.uname()
    info = {
        "cpu_count": os.cpu_count(),
        "processor": platform.processor() or None,
        "uname": f"{uname.system} {uname.node} {uname.release} {uname.version} {uname.machine}",
        "python": platform.python_version(),
    }
    info["cpu_model"] = cpu_model()
    try:
        info["memory_bytes"] = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        info["load_average_at_start"] = list(os.getloadavg())
    except (OSError, ValueError):
        pass
    return info


def versions() -> dict:
    out = {}
    for package in ("torch", "deepspeed", "transformers", "safetensors"):
        try:
            out[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            out[package] = None
    return out


def mb(value: float) -> str:
    return f"{value / 1e6:,.1f}"


def run_benchmark(size: str, work: Path, max_shard_size: str, save_repeats: int) -> dict:
    from data_pipeline.synthetic import write_synthetic

    started, machine = datetime.now(UTC), machine_info()
    print(f"[data] synthetic dataset + text tokenizer in {work}")
    write_synthetic(work / "data", seed=0, num_train=SIZES[size]["num_train"], num_eval=8)

    print("[save] child process: build engine, one training step, CheckpointManager.save")
    save = run_phase("save", work, size, save_repeats)
    tag_dir = Path(save["checkpoint_dir"])
    ckpt_bytes, ckpt_files = directory_bytes(tag_dir)
    root_bytes, _ = directory_bytes(tag_dir.parent)

    print("[load] child process: fresh engine, engine.load_checkpoint + trainer state, bitwise check")
    load = run_phase("load", work, size)

    print(f"[export] child process: python -m training.export (max shard size {max_shard_size})")
    export_dir = work / "export"
    export_s, export_rss = run_child(
        "export", export_command(tag_dir.parent, export_dir, max_shard_size), work
    )
    if size == "small":  # the tiny model is the baseline: the export above is its measurement
        base_s, base_rss = export_s, export_rss
    else:
        print(
            "[baseline] the same export on a checkpoint of the tiny model (interpreter + imports + fixed costs)"
        )
        base_work = work / "baseline"
        base_work.mkdir()
        (base_work / "data").symlink_to(work / "data")
        base_ckpt = Path(run_phase("save", base_work, "small")["checkpoint_dir"]).parent
        base_s, base_rss = run_child(
            "export_baseline", export_command(base_ckpt, work / "export_baseline", "5GB"), work
        )
    export_bytes, export_files = directory_bytes(export_dir)

    params = save["parameters"]
    fp32_bytes = 4 * params["total"]
    llm_shards = [v for k, v in export_files.items() if k.startswith("llm/") and k.endswith(".safetensors")]
    largest_shard = max(llm_shards) if llm_shards else 0
    spec = SIZES[size]
    return {
        "benchmark": "checkpoint",
        "size": size,
        "date": started.isoformat(timespec="seconds"),
        "git_commit": git("rev-parse", "HEAD"),
        "git_dirty": bool(git("status", "--porcelain", "--untracked-files=no")),
        "machine": machine,
        "versions": versions(),
        "setup": {
            "world_size": 1,
            "backend": "gloo",
            "zero_stage": 3,
            "precision": "fp32",
            "optimizer": "torch AdamW (client optimizer)",
            "stage_kind": "ett",
            "llm": spec["llm"],
            "tokenizer": {k: list(v) if isinstance(v, tuple) else v for k, v in spec["tokenizer"].items()},
            "discriminator": spec["loss"],
            "image_size": list(spec["image_size"]),
            "seq_len": spec["seq_len"],
            "page_cache": "warm (checkpoint read back right after it was written)",
            "workdir": str(work),
        },
        "parameters": params,
        "trainable_parameters": save["trainable_parameters"],
        "discriminator_parameters": save["discriminator_parameters"],
        "fp32_model_bytes": fp32_bytes,
        "save_seconds": save["save_seconds"],
        "save_total_seconds": save["save_total_seconds"],
        "blocking_save_target_seconds": BLOCKING_SAVE_TARGET_S,
        "within_blocking_save_target": save["save_seconds"] <= BLOCKING_SAVE_TARGET_S,
        "verify_seconds": load["verify_seconds"],
        "checkpoint_bytes": ckpt_bytes,
        "load_seconds": load["load_seconds"],
        "export_seconds": export_s,
        "export_peak_rss_bytes": export_rss,
        "weights_match": load["weights_match"],
        "optimizer_state_match": load["optimizer_state_match"],
        "save": {
            **save,
            "checkpoint_bytes": ckpt_bytes,
            "checkpoint_root_bytes": root_bytes,
            "checkpoint_files": ckpt_files,
            "bytes_over_fp32_model": ckpt_bytes / fp32_bytes,
            "write_mb_per_s": ckpt_bytes / 1e6 / save["save_total_seconds"],
        },
        "load": {
            **load,
            "read_mb_per_s": ckpt_bytes / 1e6 / load["load_seconds"],
            "verify_mb_per_s": load["verified_bytes"] / 1e6 / load["verify_seconds"],
        },
        "export": {
            "seconds": export_s,
            "peak_rss_bytes": export_rss,
            "baseline_seconds": base_s,
            "baseline_peak_rss_bytes": base_rss,
            "peak_rss_over_fp32_model": export_rss / fp32_bytes,
            "peak_rss_above_baseline_over_fp32_model": (export_rss - base_rss) / fp32_bytes,
            "docstring_bound_bytes": base_rss + fp32_bytes + largest_shard,
            "within_docstring_bound": export_rss <= base_rss + fp32_bytes + largest_shard,
            "max_shard_size": max_shard_size,
            "largest_llm_shard_bytes": largest_shard,
            "export_bytes": export_bytes,
            "export_files": export_files,
        },
    }


def print_table(r: dict) -> None:
    params, save, load, export = r["parameters"], r["save"], r["load"], r["export"]
    fp32 = r["fp32_model_bytes"]
    parts = ", ".join(f"{k} {v / 1e6:.2f}M" for k, v in params.items() if k != "total")
    print()
    print(f"model: {params['total'] / 1e6:.1f}M parameters ({parts}); fp32 copy {mb(fp32)} MB; "
          f"discriminator {r['discriminator_parameters'] / 1e6:.2f}M")  # fmt: skip
    print(f"machine: {r['machine'].get('cpu_model') or r['machine']['processor']} x{r['machine']['cpu_count']}; "
          f"torch {r['versions']['torch']}, deepspeed {r['versions']['deepspeed']}; commit {str(r['git_commit'])[:10]}")  # fmt: skip
    later = max(len(save["save_seconds_all"]) - 1, 1)
    rows = [
        (f"save: Trainer.save, blocking (median of {later})", f"{save['save_seconds']:.2f}",
         f"target <= {r['blocking_save_target_seconds']:.0f} s: "
         f"{'met' if r['within_blocking_save_target'] else 'MISSED'}; training goes on after this"),
        ("  first save (allocates the host buffers)", f"{save['save_seconds_all'][0]:.2f}",
         f"until published {save['save_total_seconds_all'][0]:.2f} s"),
        (f"save: total, until published (median of {later})", f"{save['save_total_seconds']:.2f}",
         f"{mb(save['checkpoint_bytes'])} MB on disk ({save['bytes_over_fp32_model']:.2f}x fp32), "
         f"{save['write_mb_per_s']:.0f} MB/s, written in the background"),
        ("  then os.sync() (dirty pages to disk)", f"{save['sync_after_save_seconds']:.2f}",
         "not part of the save: it is published once the files are in the page cache"),
        ("verify: size + crc32 of every file", f"{load['verify_seconds']:.2f}",
         f"{load['verify_mb_per_s']:.0f} MB/s, one rank (warm page cache); "
         f"{'intact' if load['verify_problem'] is None else load['verify_problem']}"),
        ("load: engine.load_checkpoint", f"{load['engine_load_checkpoint_seconds']:.2f}",
         f"{load['read_mb_per_s']:.0f} MB/s (warm page cache)"),
        ("load: + trainer state (data, RNG, disc.)", f"{load['trainer_state_seconds']:.2f}",
         f"weights match: {load['weights_match']}, optimizer: {load['optimizer_state_match']}, "
         f"rng: {load['rng_match']}"),
        ("load: total", f"{load['load_seconds']:.2f}", ""),
        ("export: python -m training.export", f"{export['seconds']:.2f}",
         f"peak RSS {mb(export['peak_rss_bytes'])} MB = {export['peak_rss_over_fp32_model']:.2f}x fp32 model"),
        ("  baseline: same export of the tiny model", f"{export['baseline_seconds']:.2f}",
         f"peak RSS {mb(export['baseline_peak_rss_bytes'])} MB; export above it "
         f"{mb(export['peak_rss_bytes'] - export['baseline_peak_rss_bytes'])} MB = "
         f"{export['peak_rss_above_baseline_over_fp32_model']:.2f}x fp32"),
        ("(save child: build / train step)", f"{save['engine_build_seconds']:.1f} / {save['train_step_seconds']:.1f}",
         f"peak RSS {mb(save['peak_rss_bytes'])} MB"),
        ("(load child: build)", f"{load['engine_build_seconds']:.1f}", f"peak RSS {mb(load['peak_rss_bytes'])} MB"),
    ]  # fmt: skip
    width = max(len(row[0]) for row in rows)
    print(f"{'phase':<{width}}  {'seconds':>9}  notes")
    for name, seconds, notes in rows:
        print(f"{name:<{width}}  {seconds:>9}  {notes}")
    bound = export["docstring_bound_bytes"]
    print(f"export.py's bound (baseline + one fp32 copy + one shard of {mb(export['largest_llm_shard_bytes'])} MB): "
          f"{mb(bound)} MB -> {'within' if export['within_docstring_bound'] else 'EXCEEDED'}")  # fmt: skip


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--size", choices=sorted(SIZES), default="default")
    parser.add_argument(
        "--json", dest="json_out", default=str(DEFAULT_JSON), help="write results to this JSON file"
    )
    parser.add_argument(
        "--workdir", default=None, help="where the data, checkpoint and export go (default: a temp dir)"
    )
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    parser.add_argument(
        "--max-shard-size", default="5GB", help="passed to training.export (its default: 5GB)"
    )
    parser.add_argument(
        "--save-repeats", type=int, default=3, help="timed saves (the table shows their median; JSON has all)"
    )
    parser.add_argument("--phase", choices=("save", "load"), default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.phase is not None:
        work = Path(args.workdir)
        if args.phase == "save":
            result = phase_save(work, args.size, args.save_repeats)
        else:
            result = phase_load(work, args.size)
        (work / f"result_{args.phase}.json").write_text(json.dumps(result, indent=1))
        return 0

    if args.workdir:
        work = Path(args.workdir)
        if work.exists() and any(work.iterdir()):
            parser.error(f"--workdir {work} exists and is not empty")
        work.mkdir(parents=True, exist_ok=True)
    else:
        work = Path(tempfile.mkdtemp(prefix="ett-ckpt-bench-"))
    print(f"checkpoint benchmark, size={args.size}, {datetime.now(UTC):%Y-%m-%d %H:%M:%S} UTC")
    try:
        result = run_benchmark(args.size, work, args.max_shard_size, args.save_repeats)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    if not args.keep:
        result["setup"]["workdir"] += " (removed)"
    result["machine"]["load_average_at_end"] = list(os.getloadavg())
    print_table(result)
    out = Path(args.json_out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")
    intact = result["load"]["verify_problem"] is None
    return 0 if result["weights_match"] and result["optimizer_state_match"] and intact else 1


if __name__ == "__main__":
    sys.exit(main())
