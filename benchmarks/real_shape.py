"""One ZeRO-3 training step of stage 2 (ETT) at the paper's real shapes, on one CPU process.

    python -m benchmarks.real_shape [--size real|small] [--steps 2] [--llm-layers 2] [--gan] [--json OUT]
                                    [--workdir DIR] [--max-rss-gib 21] [--reserve-gib 1]

Shapes (`real`, the default):
  tokenizer  the paper-scale IBQ tokenizer of modeling/tokenizer/config.py (ch 128, ch_mult [1,1,2,2,4], 4 res
             blocks, attention at the lowest level, z 256, D=256, K=131,072, downsample 16) on 512x512 images: a
             32x32 grid, 1,024 codes per image;
  LLM        Qwen2.5-1.5B's shapes (hidden 1536, 12 heads, 2 KV heads, SwiGLU 8960, QKV bias, tied 151,936-token
             embedding, rope theta 1e6) with --llm-layers layers (2; the full model has 28);
  projector  Linear(256 -> 1536), GELU, Linear(1536 -> 1536).
`small` is the tests' tiny model (24x48 images, seconds), for the smoke test.

The step is the trainer's own: `training.trainer.Trainer(cfg)`, `setup("none")` (the model built under
deepspeed.zero.Init, ZeRO-3 from ds_configs/zero3.json, torch AdamW, the streaming loader), then `train_step()`,
as benchmarks/checkpoint.py drives it. The TrainConfig is built in code with benchmarks/train_throughput.py's
`train_config` (TrainConfig.validate is not run: it demands stage.init_from for stage.kind=ett, and the weights
here are random). Micro batch 1: one packed row of data.seq_len=1088 positions holding one 512-px image (1,058
positions: 1,024 codes, 32 row ends, 2 markers) and a short caption from data_pipeline.synthetic (its images are
resized to 512x512 by the loader). fp32, gloo, one process. L = L_cap + 0.25 L_vq with the LPIPS term off
(perceptual_weight 0: it needs a local VGG16 file) and, unless --gan, the GAN term off (no discriminator).

Recorded: parameters per component (and trainable), wall time of the build and of each step, the step's loss
terms, the forward FLOPs the trainer counts on its first step, and the peak RSS (resource.getrusage) after the
build and after each step; a table on stdout and JSON (default benchmarks/results/real_shape_cpu.json for
`real`), rewritten after the build and after every step. A watchdog thread prints the RSS every 30 s, and ends the
process (exit 3) when the RSS passes --max-rss-gib or the machine's available memory falls under --reserve-gib, so
that a shared machine is never pushed into the OOM killer. The JSON then holds what was measured so far and an
`aborted` record (phase, RSS). On a 24-GiB machine the first step fits (BENCHMARKS.md, "Real shapes on CPU"); from
the second on, the Adam moments (8 bytes per parameter) are resident too, and the step needs about 3.5 GiB more.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import sys
import tempfile
import threading
import time
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path

from benchmarks.provenance import REPO_ROOT, cpu_model, format_number, git
from benchmarks.train_throughput import PAPER_IBQ

DEFAULT_JSON = REPO_ROOT / "benchmarks" / "results" / "real_shape_cpu.json"
GIB = 1024**3

# Qwen2.5-1.5B (its public config.json) with the layer count left to --llm-layers.
QWEN25_15B = {
    "vocab_size": 151936,
    "hidden_size": 1536,
    "num_heads": 12,
    "num_kv_heads": 2,
    "intermediate_size": 8960,
    "rope_theta": 1000000.0,
    "rms_norm_eps": 1e-6,
    "max_position_embeddings": 131072,
    "qkv_bias": True,
    "tie_embeddings": True,
}
SIZES = {
    "real": {"llm": QWEN25_15B, "tokenizer": PAPER_IBQ, "image_size": [512, 512], "seq_len": 1088},
    "small": {
        "llm": {"vocab_size": 256, "hidden_size": 32, "num_heads": 4, "num_kv_heads": 2, "intermediate_size": 64,
                "max_position_embeddings": 256},
        "tokenizer": {"base_channels": 8, "channel_mult": [1, 1, 2, 2], "norm_groups": 4, "z_channels": 16,
                      "code_dim": 16, "codebook_size": 32},
        "image_size": [24, 48],
        "seq_len": 96,
    },
}  # fmt: skip


def progress(message: str) -> None:
    print(f"  [{time.strftime('%H:%M:%S')}] {message}", flush=True)


def current_rss() -> int:
    """This process's resident set size now, in bytes (/proc/self/statm)."""
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def peak_rss() -> int:
    """Peak RSS of this process so far, in bytes (ru_maxrss is in KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def mem_available() -> int | None:
    """The machine's MemAvailable (/proc/meminfo), in bytes; None where unknown."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


class Watchdog(threading.Thread):
    """Prints the phase and RSS every `every` seconds. Ends the process (exit 3) when its RSS passes `limit` or the
    machine's available memory falls under `reserve` (other processes share it), after writing the partial result
    with an `aborted` record: the JSON then says where and at what RSS the run stopped."""

    def __init__(self, limit: int, reserve: int, every: float = 30.0) -> None:
        super().__init__(daemon=True)
        self.limit, self.reserve, self.every = limit, reserve, every
        self.result: dict | None = None
        self.out: Path | None = None
        self.set_phase("starting")
        self.stop = threading.Event()

    def set_phase(self, phase: str) -> None:
        self.phase, self.phase_start = phase, time.time()

    def abort(self, reason: str, rss: int) -> None:
        progress(f"{reason} during {self.phase}: aborting")
        if self.result is not None and self.out is not None:
            self.result["aborted"] = {
                "phase": self.phase,
                "seconds_into_phase": time.time() - self.phase_start,
                "rss_bytes": rss,
                "peak_rss_bytes": peak_rss(),
                "reason": reason,
            }
            write_json(self.result, self.out)
        os._exit(3)

    def run(self) -> None:
        last = time.time()
        while not self.stop.wait(0.25):
            rss, available = current_rss(), mem_available()
            if rss > self.limit:
                self.abort(f"RSS {rss / GIB:.2f} GiB passed --max-rss-gib {self.limit / GIB:.1f}", rss)
            if available is not None and available < self.reserve:
                self.abort(f"the machine's available memory fell to {available / GIB:.2f} GiB (RSS "
                           f"{rss / GIB:.2f} GiB; --reserve-gib {self.reserve / GIB:.1f})", rss)  # fmt: skip
            if time.time() - last >= self.every:
                last = time.time()
                progress(f"{self.phase}: {last - self.phase_start:.0f} s in, RSS {rss / GIB:.2f} GiB "
                         f"(peak {peak_rss() / GIB:.2f} GiB)")  # fmt: skip


def write_json(result: dict, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    tmp.replace(out)


def sections(size: str, work: Path, llm_layers: int, gan: bool) -> dict:
    spec = SIZES[size]
    data = work / "data"
    return {
        "stage": {"name": "real_shape_ett", "kind": "ett", "alpha": 0.25},
        "model": {
            "llm": {**spec["llm"], "num_layers": llm_layers},
            "tokenizer": {
                **spec["tokenizer"],
                "loss": {"perceptual_weight": 0.0, "gan_weight": 0.1 if gan else 0.0},
            },
            "projector": {"depth": 2},
        },
        "data": {
            "train": [{"path": str(data / "caption_train")}],
            "text_tokenizer": str(data / "tokenizer"),
            "image_size": spec["image_size"],
            "seq_len": spec["seq_len"],
            "num_workers": 0,
        },
        "optim": {"lr": 4e-5, "weight_decay": 0.0, "betas": [0.9, 0.95], "grad_clip": 1.0},
        "schedule": {"max_steps": 10, "warmup_ratio": 0.0, "kind": "constant"},
        "train": {"global_batch_size": 1, "micro_batch_size": 1, "precision": "fp32", "log_every": 1,
                  "output_dir": str(work / "run"), "progress": False},
        "checkpoint": {"save_every": 0, "resume": "none"},
        "deepspeed": {"config": str(REPO_ROOT / "ds_configs" / "zero3.json")},
    }  # fmt: skip


def component_counts(model) -> tuple[dict[str, int], dict[str, int]]:
    """(all, trainable) parameters per top-level component, with ZeRO-3's full sizes (ds_numel)."""
    total: dict[str, int] = {}
    trainable: dict[str, int] = {}
    for name, param in model.named_parameters():
        part, numel = name.split(".", 1)[0], int(getattr(param, "ds_numel", param.numel()))
        total[part] = total.get(part, 0) + numel
        if param.requires_grad:
            trainable[part] = trainable.get(part, 0) + numel
    total["total"], trainable["total"] = sum(total.values()), sum(trainable.values())
    return total, trainable


def machine() -> dict:
    info = {"cpu_model": cpu_model(), "cpu_count": os.cpu_count(), "python": platform.python_version()}
    try:
        info["memory_bytes"] = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        info["load_average_at_start"] = list(os.getloadavg())
    except (OSError, ValueError):
        pass
    return info


def versions() -> dict:
    out = {}
    for package in ("torch", "deepspeed"):
        try:
            out[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            out[package] = None
    return out


def run(
    size: str, work: Path, steps: int, llm_layers: int, gan: bool, watchdog: Watchdog, out: Path | None
) -> dict:
    """The benchmark; `result` is written to `out` (when given) after the build and after every step, so a run
    stopped by the watchdog (or killed) leaves what it measured."""
    import torch

    from benchmarks.train_throughput import train_config
    from data_pipeline.synthetic import write_synthetic
    from training.trainer import Trainer

    started = datetime.now(UTC)
    result: dict = {
        "size": size,
        "date": started.isoformat(timespec="seconds"),
        "git_commit": git("rev-parse", "HEAD"),
        "machine": machine(),
        "versions": versions(),
        "torch_threads": torch.get_num_threads(),
        "steps_requested": steps,
        "steps": [],
    }
    watchdog.result, watchdog.out = result, out

    def checkpoint_result() -> None:
        result["peak_rss_bytes"] = peak_rss()
        result["total_seconds"] = (datetime.now(UTC) - started).total_seconds()
        if out is not None:
            write_json(result, out)

    watchdog.set_phase("data")
    progress(f"data: synthetic captions + text tokenizer in {work / 'data'} (resized to "
             f"{SIZES[size]['image_size']} by the loader)")  # fmt: skip
    write_synthetic(work / "data", seed=0, num_train=8, num_eval=1)
    cfg_sections = sections(size, work, llm_layers, gan)
    cfg = train_config(cfg_sections)
    result["config"] = cfg_sections
    tok = cfg.model.tokenizer
    grid = (cfg.data.image_size[0] // tok.downsample_factor, cfg.data.image_size[1] // tok.downsample_factor)
    result["shape"] = {
        "image_size": list(cfg.data.image_size),
        "code_grid": list(grid),
        "codes_per_image": grid[0] * grid[1],
        "codebook_size": tok.codebook_size,
        "code_dim": tok.code_dim,
        "downsample": tok.downsample_factor,
        "llm_hidden_size": cfg.model.llm.hidden_size,
        "llm_vocab_size": cfg.model.llm.vocab_size,
        "llm_layers": cfg.model.llm.num_layers,
        "seq_len": cfg.data.seq_len,
        "micro_batch_size": cfg.train.micro_batch_size,
        "gan_weight": tok.loss.gan_weight,
        "perceptual_weight": tok.loss.perceptual_weight,
    }

    watchdog.set_phase("build")
    progress(
        "build: Trainer(cfg) + setup('none'): the model under deepspeed.zero.Init, ZeRO-3 engine, AdamW, loader"
    )
    start = time.perf_counter()
    trainer = Trainer(cfg)
    trainer.setup("none")
    result["build_seconds"] = time.perf_counter() - start
    result["peak_rss_after_build_bytes"] = peak_rss()
    counts, trainable = component_counts(trainer.engine.module)
    result["parameters"], result["trainable_parameters"] = counts, trainable
    if trainer.discriminator is not None:
        disc = trainer.discriminator.discriminator
        result["discriminator_parameters"] = int(sum(p.numel() for p in disc.parameters()))
    progress(f"build: {result['build_seconds']:.1f} s, {counts['total'] / 1e6:.1f}M parameters "
             f"({', '.join(f'{k} {v / 1e6:.1f}M' for k, v in counts.items() if k != 'total')}), "
             f"peak RSS {result['peak_rss_after_build_bytes'] / GIB:.2f} GiB")  # fmt: skip

    checkpoint_result()
    trainer.engine.train()
    for index in range(steps):
        watchdog.set_phase(f"step {index + 1}/{steps}")
        progress(f"step {index + 1}/{steps}: forward, backward, ZeRO-3 AdamW step"
                 + (" (the first also counts FLOPs)" if index == 0 else ""))  # fmt: skip
        start = time.perf_counter()
        terms = trainer.train_step()
        seconds = time.perf_counter() - start
        record = {
            "seconds": seconds,
            "loss": terms["loss/total"],
            "terms": terms,
            "peak_rss_bytes": peak_rss(),
            "tokens": trainer.step_tokens,
            "samples": trainer.step_samples,
        }
        result["steps"].append(record)
        result["forward_flops"] = trainer.forward_flops
        checkpoint_result()
        progress(f"step {index + 1}/{steps}: {seconds:.1f} s, loss {record['loss']:.4f}, "
                 f"peak RSS {record['peak_rss_bytes'] / GIB:.2f} GiB")  # fmt: skip
    result["fits_24_gib"] = peak_rss() < 24 * GIB
    watchdog.set_phase("done")
    checkpoint_result()
    return result


def print_table(r: dict) -> None:
    shape = r["shape"]
    print(f"\nReal-shape ETT stage-2 step on CPU ({r['machine']['cpu_model']}, {r['machine']['cpu_count']} cores, "
          f"{r['torch_threads']} torch threads, fp32, ZeRO-3, 1 process)")  # fmt: skip
    print(f"  image {shape['image_size'][0]}x{shape['image_size'][1]} -> {shape['codes_per_image']} codes, "
          f"K={shape['codebook_size']:,}, D={shape['code_dim']}, downsample {shape['downsample']}; "
          f"LLM hidden {shape['llm_hidden_size']}, vocab {shape['llm_vocab_size']:,}, {shape['llm_layers']} layers; "
          f"seq_len {shape['seq_len']}, micro batch {shape['micro_batch_size']}")  # fmt: skip
    rows = [(f"parameters: {k}", f"{v:,} ({r['trainable_parameters'].get(k, 0):,} trainable)")
            for k, v in r["parameters"].items()]  # fmt: skip
    if "discriminator_parameters" in r:
        rows.append(("discriminator (outside the engine)", f"{r['discriminator_parameters']:,}"))
    rows += [
        ("build (Trainer + setup)", f"{r['build_seconds']:.1f} s"),
        ("peak RSS after build", f"{r['peak_rss_after_build_bytes'] / GIB:.2f} GiB"),
    ]
    for i, step in enumerate(r["steps"]):
        rows.append((f"step {i + 1}", f"{step['seconds']:.1f} s, loss {format_number(step['loss'], 5)}, "
                     f"peak RSS {step['peak_rss_bytes'] / GIB:.2f} GiB"))  # fmt: skip
    if r["steps"]:
        terms = ", ".join(f"{k} {format_number(v, 4)}" for k, v in r["steps"][0]["terms"].items())
        rows.append(("step 1 terms", terms))
    if r.get("forward_flops"):
        rows.append(("forward FLOPs (counted)", f"{r['forward_flops'] / 1e12:.2f} TFLOP"))
    rows.append(("peak RSS", f"{r['peak_rss_bytes'] / GIB:.2f} GiB (fits in 24 GiB: "
                 f"{format_number(r['fits_24_gib'])})"))  # fmt: skip
    width = max(len(name) for name, _ in rows)
    for name, value in rows:
        print(f"  {name:<{width}}  {value}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.real_shape", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--size", choices=sorted(SIZES), default="real")
    parser.add_argument("--steps", type=int, default=2, help="training steps to time (default 2)")
    parser.add_argument(
        "--llm-layers", type=int, default=2, help="LLM layers (default 2; Qwen2.5-1.5B has 28)"
    )
    parser.add_argument(
        "--gan", action="store_true", help="with the discriminator and L_GAN (gan_weight 0.1)"
    )
    parser.add_argument("--json", default=None, help=f"output JSON (default for --size real: {DEFAULT_JSON})")
    parser.add_argument("--workdir", default=None, help="data and run directory (default: a temporary one)")
    parser.add_argument("--max-rss-gib", type=float, default=21.0, help="abort past this RSS (default 21)")
    parser.add_argument(
        "--reserve-gib",
        type=float,
        default=1.0,
        help="abort when the machine's available memory falls under this (default 1)",
    )
    args = parser.parse_args(argv)
    if args.steps < 1 or args.llm_layers < 1:
        parser.error("--steps and --llm-layers must be >= 1")
    out = Path(args.json) if args.json else (DEFAULT_JSON if args.size == "real" else None)
    watchdog = Watchdog(int(args.max_rss_gib * GIB), int(args.reserve_gib * GIB))
    watchdog.start()
    with tempfile.TemporaryDirectory(prefix="ett_real_shape_") as tmp:
        work = Path(args.workdir) if args.workdir else Path(tmp)
        result = run(args.size, work, args.steps, args.llm_layers, args.gan, watchdog, out)
    watchdog.stop.set()
    print_table(result)
    if out is not None:
        write_json(result, out)
        print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
