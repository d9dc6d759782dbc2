"""Training throughput of our trainer against a Hugging Face Trainer + DeepSpeed ZeRO-3 baseline, same model and batches.

    python -m benchmarks.train_throughput [--config tiny|gpu1b] [--steps N] [--warmup N] [--repeats R]
                                          [--arms both|ours|baseline] [--json OUT] [--threads T]
                                          [section.key=value ...] [--baseline-zero KEY=VALUE ...]

Workload: a stage-2 ETT step (stage.kind=ett: tokenizer + projector + LLM all trainable, L = L_cap + 0.25 L_vq) on
the embedded synthetic data (`data_pipeline.synthetic`, written to a temporary directory unless --data is given),
one process, ZeRO-3, fp32 on CPU and bf16 on CUDA. Each arm runs in its own child process (clean peak-memory
numbers, no DeepSpeed or accelerate global state shared between them). On CPU, by default (`--interleave 5`), the
two processes run at once and take turns: an arm runs 5 steps, hands the turn over through a pipe and waits, and its
clock stops while it waits. A virtual machine's speed drifts by tens of percent within minutes; taking turns
every second or so puts that drift on both arms alike, where running them one after the other puts it on whichever
ran during the slow minutes. `--interleave 0`, the default on CUDA (two gpu1b arms do not fit one GPU together),
runs the arms one after the other.

  ours      `training.trainer.Trainer.fit`, the loop `python -m training.train` runs, unchanged: the model from
            training.stages.build_model under deepspeed.zero.Init, the engine from training.engine.build_engine
            with the ds_config of build_ds_config, batches from training.data.build_train_loader, its FLOP
            counting on the first step, per-step loss/grad-norm checks and metric logging (every
            train.log_every steps to metrics.jsonl and TensorBoard). Running the real loop rather than a copy
            of it means that whatever the loop costs is measured. The benchmark only observes it, through the
            Trainer's extension points: `build_loader` wraps the loader to time each `next()` (data-loading
            wait) and to remember the batches, `after_step` stamps the end of each step (after a CUDA
            synchronize) and records its loss, and `fit(stop_at=...)` ends after the last timed step (so no
            final checkpoint or hand-off is written).
  baseline  the way LLaVA / Emu3 train today: `transformers.Trainer` with `TrainingArguments(deepspeed=<dict>)`
            (LLaVA's scripts/zero3.json: ZeRO-3, overlap_comm, contiguous_gradients, the HF "auto" bucket sizes
            reduce = h^2, prefetch = 0.9 h^2, persistence = 10 h with h the LLM hidden size, written out because
            ETTModel has no HF `config.hidden_size`), HF's default optimizer and a constant schedule with the
            same lr, betas, eps, weight decay and gradient clipping, and a Trainer subclass whose compute_loss
            calls the same ETTModel forward. Same module classes and config, same seed, so the same initial
            weights (built without zero.Init: deepspeed.initialize partitions them, as for any non-HF module);
            the ZeRO-3 external-parameter registration (codebook, tied LM head) is applied too, without which
            ZeRO-3 hands those modules empty partitions. Its batches are the same ones: the same loader, same
            config and seed, drawn up front and served from memory by a map-style dataset in order, so the
            baseline pays no data-loading cost at all (this favours the baseline). `same_batches` in the JSON
            checks the content hashes of both arms' batches.

Both arms run the same number of warm-up steps (not timed; ours counts FLOPs on its first step, the baseline counts
them on its first forward too) then the same number of timed steps, with per-step losses recorded; `first_loss_*`
must agree (same weights, same batch), which shows the comparison is apples to apples.

Reported per arm: tokens/s (non-padding sequence positions, image placeholders included, as `perf/tokens_per_s`),
images/s, median step time, peak memory (CUDA: torch.cuda.max_memory_allocated; CPU: peak RSS of the arm's
process), TFLOP/s and MFU from training/flops.py (forward FLOPs of the first micro-batch counted by
FlopCounterMode plus the Triton codebook kernels' GEMMs, x3 for forward + backward; the peak is a bf16 matmul peak
measured once in the parent process on CUDA and handed to both arms as ETT_PEAK_TFLOPS, or ETT_PEAK_TFLOPS when
set; on CPU MFU needs ETT_PEAK_TFLOPS), and for ours the fraction of step time spent waiting for the next batch.
`--arms ours` (or `baseline`) runs one arm only; the ratios and cross-arm checks are then null. `--repeats R` runs
the comparison R times (fresh processes; the arm that goes first alternates) and keeps, per arm, the repeat with the
median tokens/s; `ratio_per_repeat` in the JSON holds each repeat's own ours/baseline ratio. The discriminator is
off (model.tokenizer.loss.gan_weight=0: the HF baseline has no second optimizer step) and LPIPS is off (it needs
local VGG weights); starting weights are random (a throughput benchmark needs no pretrained weights;
TrainConfig.validate's demand for stage.init_from is the one check not run).

On CPU each arm runs with one thread (--threads; OMP_NUM_THREADS and torch.set_num_threads): with two threads
on a machine that other jobs share, OpenMP barriers make timings erratic (a small conv was 50x slower). Section
overrides apply to both arms (same model and batches); `--baseline-zero` changes only the baseline's ZeRO entries,
e.g. `--baseline-zero reduce_bucket_size=50000000 stage3_prefetch_bucket_size=50000000
stage3_param_persistence_threshold=100000` gives it our trainer's values (deepspeed.reduce_bucket_size and
deepspeed.param_persistence_threshold), which separates what the ZeRO settings buy from what the trainer buys (put
section overrides before it).

Configurations: `tiny` (CPU, the test suite's tiny model shapes; 30 timed steps take about a minute on 2 cores) and
`gpu1b` (CUDA only: a ~1.0B-parameter Qwen2.5-1.5B-shaped LLM with 16 layers, and the paper's IBQ tokenizer,
ch 128, ch_mult [1,1,2,2,4], 4 res blocks, K=131072, D=256, on 256x256 images; 1.125B parameters in all). A step
is 4 packed rows of 2048 positions with ~28 images: about 37 TFLOP forward (LLM ~17.7, tokenizer ~0.7 per image),
~110 TFLOP per training step; activations need ~90-110 GB, so GPUs under 100 GiB get 2 rows (an H100 80GB).
"""

from __future__ import annotations

import argparse
import copy
import datetime
import hashlib
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.provenance import REPO_ROOT, cpu_model, git

DEFAULT_JSON = "benchmarks/results/train_throughput.json"

# Stage-2 ETT sections; data paths and output_dir are filled in at run time.
# The paper-scale IBQ tokenizer (modeling/tokenizer/config.py): `resolution` 256 is the nominal resolution that
# places attention (attn_resolutions [16]) at the lowest level, whatever the image size.
PAPER_IBQ = {
    "resolution": 256,
    "base_channels": 128,
    "channel_mult": [1, 1, 2, 2, 4],
    "num_res_blocks": 4,
    "attn_resolutions": [16],
    "norm_groups": 32,
    "z_channels": 256,
    "code_dim": 256,
    "codebook_size": 131072,
}
_COMMON = {
    "stage": {"name": "bench_ett", "kind": "ett"},
    "optim": {"lr": 1e-4, "weight_decay": 0.0, "betas": [0.9, 0.95], "eps": 1e-8, "grad_clip": 1.0},
    "schedule": {"warmup_ratio": 0.0, "kind": "constant"},
    "checkpoint": {"save_every": 0, "resume": "none"},
    "deepspeed": {"config": "ds_configs/zero3.json"},
}
CONFIGS = {
    "tiny": {
        "needs_cuda": False,
        "warmup": 5,
        "steps": 30,
        "num_train": 600,
        "sections": {
            "model": {
                "llm": {
                    "vocab_size": 256,
                    "hidden_size": 32,
                    "num_layers": 2,
                    "num_heads": 4,
                    "num_kv_heads": 2,
                    "intermediate_size": 64,
                    "max_position_embeddings": 256,
                },
                "tokenizer": {
                    "base_channels": 8,
                    "channel_mult": [1, 1, 2, 2],
                    "norm_groups": 4,
                    "z_channels": 16,
                    "code_dim": 16,
                    "codebook_size": 32,
                    "loss": {"gan_weight": 0.0},
                },
                "ett": {},
            },
            "data": {"image_size": [24, 48], "seq_len": 96, "num_workers": 1},
            "train": {"global_batch_size": 4, "micro_batch_size": 4, "log_every": 10, "progress": False},
        },
    },
    "gpu1b": {
        "needs_cuda": True,
        "warmup": 5,
        "steps": 20,
        "num_train": 2000,
        "sections": {
            "model": {
                # Qwen2.5-1.5B shapes (hidden 1536, 12 heads, 2 KV heads, SwiGLU 8960, QKV bias, tied 151,936-token
                # embedding, rope theta 1e6) with 16 instead of 28 layers: 0.98B parameters.
                "llm": {
                    "vocab_size": 151936,
                    "hidden_size": 1536,
                    "num_layers": 16,
                    "num_heads": 12,
                    "num_kv_heads": 2,
                    "intermediate_size": 8960,
                    "rope_theta": 1000000.0,
                    "max_position_embeddings": 4096,
                    "qkv_bias": True,
                    "tie_embeddings": True,
                },
                # The paper's IBQ tokenizer (modeling/tokenizer/config.py docstring), 16x downsampling.
                "tokenizer": {
                    **PAPER_IBQ,
                    "loss": {"gan_weight": 0.0, "perceptual_weight": 0.0},
                },
                "ett": {},
            },
            # A 256x256 image is 16x16 codes + 16 row ends + 2 markers = 274 positions; with its caption about 7
            # samples pack into a 2048-position row, so a step is ~8k positions and ~28 images.
            "data": {"image_size": [256, 256], "seq_len": 2048, "num_workers": 4},
            "train": {"global_batch_size": 4, "micro_batch_size": 4, "log_every": 10, "progress": False},
        },
    },
}


# ---------------------------------------------------------------------------------------------------------------
# configuration


def stage_sections(name: str, data_dir: Path, out_dir: Path, overrides: list[str], run_steps: int) -> dict:
    """The full stage config dict of preset `name` on `data_dir`, with dotted overrides applied. The schedule is
    one step longer than the `run_steps` (warm-up + timed) steps an arm runs: the trainer stops at the schedule's
    end, and `fit(stop_at=run_steps)` then ends without the final save and hand-off."""
    from training.config import apply_overrides
    from training.run_config import TrainConfig

    sections = copy.deepcopy(_COMMON)
    for key, value in CONFIGS[name]["sections"].items():
        sections[key] = {**sections.get(key, {}), **copy.deepcopy(value)}
    sections["data"].update(
        train=[{"path": str(data_dir / "caption_train")}],
        eval=None,
        text_tokenizer=str(data_dir / "tokenizer"),
    )
    sections["train"]["output_dir"] = str(out_dir)
    sections["schedule"]["max_steps"] = run_steps + 1
    sections["deepspeed"]["config"] = str(REPO_ROOT / sections["deepspeed"]["config"])
    return apply_overrides(TrainConfig, sections, overrides)


def train_config(sections: dict):
    """TrainConfig from a sections dict. Each section is validated; TrainConfig.validate is not run because it
    requires starting weights (stage.init_from) for stage.kind=ett and this benchmark starts from random ones."""
    import dataclasses
    import typing

    from training.config import from_dict
    from training.run_config import TrainConfig

    hints = typing.get_type_hints(TrainConfig)
    kwargs = {
        f.name: from_dict(hints[f.name], sections.get(f.name, {}), f.name)
        for f in dataclasses.fields(TrainConfig)
    }
    cfg = TrainConfig(**kwargs)
    if cfg.train.eval_every:
        raise SystemExit("train_throughput: the workload runs without evaluation (train.eval_every=0)")
    return cfg


# ---------------------------------------------------------------------------------------------------------------
# measurement helpers shared by both arms (run inside the arm's child process)


def _sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def batch_hash(batch: dict) -> str:
    """Content hash of a packed batch (every tensor's bytes and every scalar)."""
    import torch

    digest = hashlib.sha1()
    for key in sorted(batch):
        value = batch[key]
        digest.update(key.encode())
        if isinstance(value, torch.Tensor):
            digest.update(str((value.dtype, tuple(value.shape))).encode())
            digest.update(value.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
        else:
            digest.update(repr(value).encode())
    return digest.hexdigest()


class Baton:
    """Turn-taking with the parent process in `--interleave` mode: the arm runs `block` steps, hands the turn back
    and waits for the next one, so the two arms never run steps at the same time and the machine's drift falls on
    both. `fds` is "READ_FD,WRITE_FD,BLOCK" from ETT_BENCH_BATON."""

    def __init__(self, fds: str):
        read_fd, write_fd, block = (int(x) for x in fds.split(","))
        self.read_fd, self.write_fd, self.block = read_fd, write_fd, block

    def wait_turn(self) -> None:
        if os.read(self.read_fd, 1) != b"g":
            raise SystemExit("train_throughput: the parent process went away")

    def hand_back(self, finished: bool) -> None:
        os.write(self.write_fd, b"f" if finished else b"p")


class StepRecorder:
    """Per-step durations, data-loading waits, token and image counts, and losses of one arm. A step's duration
    runs from the end of the step before (or from the arm's turn starting again, under a Baton) to its end."""

    def __init__(self, total_steps: int, accum: int):
        self.total_steps, self.accum = total_steps, accum
        self.durations: list[float] = []
        self.data_wait: list[float] = []
        self.batches: list[dict] = []
        self.losses: list = []
        self.fwd_flops = None
        fds = os.environ.get("ETT_BENCH_BATON")
        self.baton = Baton(fds) if fds else None
        self.resume = time.perf_counter()

    def begin(self) -> None:
        """Just before the first step: under a Baton, wait for the first turn."""
        if self.baton is not None:
            self.baton.wait_turn()
        self.resume = time.perf_counter()

    def batch_taken(self, batch: dict, waited: float) -> None:
        step = len(self.batches) // self.accum
        if step >= len(self.data_wait):
            self.data_wait.append(0.0)
        self.data_wait[step] += waited
        self.batches.append(batch)

    def end_step(self) -> bool:
        """Stamp the end of a step (and, under a Baton, hand over the turn after each block); True once the last
        step is done."""
        _sync()
        end = time.perf_counter()
        self.durations.append(end - self.resume)
        self.resume = end
        finished = len(self.durations) >= self.total_steps
        if self.baton is not None and (finished or len(self.durations) % self.baton.block == 0):
            self.baton.hand_back(finished)
            if not finished:
                self.baton.wait_turn()
                self.resume = time.perf_counter()
        return finished

    def result(self) -> dict:
        import torch

        per_step = []
        for step, duration in enumerate(self.durations):
            group = self.batches[step * self.accum : (step + 1) * self.accum]
            per_step.append(
                {
                    "duration_s": duration,
                    "data_wait_s": self.data_wait[step] if step < len(self.data_wait) else 0.0,
                    "tokens": sum(int(b.get("num_tokens", 0)) for b in group),
                    "samples": sum(int(b.get("num_samples", 0)) for b in group),
                    "images": sum(int(b["images"].shape[0]) for b in group if "images" in b),
                }
            )
        if torch.cuda.is_available():
            peak, kind = torch.cuda.max_memory_allocated(), "cuda_max_memory_allocated"
        else:
            peak, kind = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "cpu_peak_rss"
        return {
            "per_step": per_step,
            "losses": [float(x) for x in self.losses],
            "fwd_flops_first_micro_batch": self.fwd_flops,
            "peak_memory_bytes": peak,
            "memory_kind": kind,
            "batch_hashes": [batch_hash(b) for b in self.batches[: self.total_steps * self.accum]],
        }


def _flops_breakdown() -> dict:
    """training.flops' breakdown of the forward count just made, without the per-call list."""
    from training.flops import last_forward_count

    count = last_forward_count() or {}
    calls = count.pop("codebook_calls", [])
    return {**count, "codebook_kernel_calls": len(calls)}


def _param_counts(module) -> dict:
    def numel(p):
        return int(getattr(p, "ds_numel", p.numel()))

    params = list(module.named_parameters())
    return {
        "total": sum(numel(p) for _, p in params),
        "trainable": sum(numel(p) for _, p in params if p.requires_grad),
        "llm": sum(numel(p) for n, p in params if n.startswith("llm.")),
        "tokenizer": sum(numel(p) for n, p in params if n.startswith("tokenizer.")),
    }


# ---------------------------------------------------------------------------------------------------------------
# arm 1: our trainer (training.trainer.Trainer, with a clock)


class TimedLoader:
    """A loader that stamps how long each `next` waited, and otherwise is the loader it wraps."""

    def __init__(self, inner, recorder: StepRecorder):
        self.inner, self.recorder = inner, recorder

    def __next__(self):
        start = time.perf_counter()
        batch = next(self.inner)
        self.recorder.batch_taken(batch, time.perf_counter() - start)
        return batch

    def __iter__(self):
        return self

    def __getattr__(self, name):  # state_dict, load_state_dict, stats
        return getattr(self.inner, name)


def run_ours(spec: dict) -> dict:
    from training.trainer import Trainer

    cfg = train_config(spec["sections"])
    accum = cfg.train.global_batch_size // cfg.train.micro_batch_size
    total = spec["warmup"] + spec["steps"]
    recorder = StepRecorder(total, accum)
    info: dict = {}

    class TimedTrainer(Trainer):
        """The trainer `python -m training.train` runs, with its loader timed and a clock after every step."""

        def build_loader(self):
            return TimedLoader(super().build_loader(), recorder)

        def fit(self, stop_at: int | None = None) -> int:
            recorder.begin()
            return super().fit(stop_at)

        def after_step(self, terms: dict[str, float]) -> None:
            recorder.losses.append(terms["loss/total"])
            if "flops_breakdown" not in info:
                recorder.fwd_flops = self.forward_flops
                info["flops_breakdown"] = _flops_breakdown()
            recorder.end_step()

    trainer = TimedTrainer(cfg)
    trainer.setup("none")
    info["ds_config"] = trainer.ds_config
    info["params"] = _param_counts(trainer.engine.module)
    trainer.fit(stop_at=total)
    return {**recorder.result(), **info}


# ---------------------------------------------------------------------------------------------------------------
# arm 2: Hugging Face Trainer + DeepSpeed ZeRO-3


def hf_zero3_config(hidden_size: int) -> dict:
    """LLaVA's scripts/zero3.json, with HF's "auto" bucket sizes written out (h^2, 0.9 h^2, 10 h)."""
    return {
        "fp16": {"enabled": "auto"},
        "bf16": {"enabled": "auto"},
        "train_micro_batch_size_per_gpu": "auto",
        "train_batch_size": "auto",
        "gradient_accumulation_steps": "auto",
        "gradient_clipping": "auto",
        "zero_optimization": {
            "stage": 3,
            "overlap_comm": True,
            "contiguous_gradients": True,
            "sub_group_size": 1e9,
            "reduce_bucket_size": hidden_size * hidden_size,
            "stage3_prefetch_bucket_size": int(0.9 * hidden_size * hidden_size),
            "stage3_param_persistence_threshold": 10 * hidden_size,
            "stage3_max_live_parameters": 1e9,
            "stage3_max_reuse_distance": 1e9,
            "stage3_gather_16bit_weights_on_model_save": True,
        },
    }


def run_baseline(spec: dict) -> dict:
    import torch
    from transformers import Trainer, TrainerCallback, TrainingArguments

    from training.data import build_train_loader
    from training.engine import init_distributed, use_bf16
    from training.flops import count_forward_flops
    from training.stages import (
        build_loss_modules,
        build_model,
        model_inputs,
        register_zero3_external_parameters,
        stage_spec,
    )
    from training.trainer import seed_all

    cfg = train_config(spec["sections"])
    accum = cfg.train.global_batch_size // cfg.train.micro_batch_size
    total = spec["warmup"] + spec["steps"]
    recorder = StepRecorder(total, accum)
    breakdown: dict = {}
    init_distributed()  # deepspeed.init_distributed: gloo on CPU, nccl on CUDA; accelerate reuses the group
    seed_all(cfg.train.seed)
    model = build_model(cfg)
    register_zero3_external_parameters(model)
    spec_ = stage_spec(cfg)
    losses, _ = build_loss_modules(cfg, model, torch.device("cuda") if torch.cuda.is_available() else None)
    loader = build_train_loader(cfg, 0, 1)
    batches = [next(loader) for _ in range(total * accum)]
    for batch in batches:
        recorder.batch_taken(batch, 0.0)
    del loader
    ds_config = hf_zero3_config(cfg.model.llm.hidden_size)
    ds_config["zero_optimization"].update(spec.get("baseline_zero", {}))

    class Batches(torch.utils.data.Dataset):
        def __len__(self):
            return len(batches)

        def __getitem__(self, index):
            return batches[index]

    class ETTTrainer(Trainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            batch = model_inputs(inputs, spec_.batch_keys)

            def forward_loss():
                outputs = model(**{k: batch[k] for k in spec_.model_keys if k in batch}, reconstruct=True)
                return spec_.objective(outputs, batch, losses, self.state.global_step)

            if recorder.fwd_flops is None:
                recorder.fwd_flops, out = count_forward_flops(forward_loss)
                breakdown.update(_flops_breakdown())
            else:
                out = forward_loss()
            recorder.losses.append(out.loss.detach())
            return (out.loss, out) if return_outputs else out.loss

        def _get_train_sampler(self, train_dataset=None):
            return torch.utils.data.SequentialSampler(train_dataset or self.train_dataset)

    class StepClock(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            recorder.begin()

        def on_step_end(self, args, state, control, **kwargs):
            recorder.end_step()

    args = TrainingArguments(
        output_dir=str(Path(cfg.train.output_dir) / "hf"),
        deepspeed=ds_config,
        per_device_train_batch_size=1,  # one item = one packed micro-batch of train.micro_batch_size rows
        gradient_accumulation_steps=accum,
        max_steps=total,
        learning_rate=cfg.optim.lr,
        lr_scheduler_type="constant",
        warmup_steps=0,
        weight_decay=cfg.optim.weight_decay,
        adam_beta1=cfg.optim.betas[0],
        adam_beta2=cfg.optim.betas[1],
        adam_epsilon=cfg.optim.eps,
        max_grad_norm=cfg.optim.grad_clip,
        bf16=use_bf16(cfg),
        logging_steps=cfg.train.log_every,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        remove_unused_columns=False,
        dataloader_num_workers=0,
        seed=cfg.train.seed,
    )
    trainer = ETTTrainer(
        model=model,
        args=args,
        train_dataset=Batches(),
        data_collator=lambda items: items[0],
        callbacks=[StepClock()],
    )
    trainer.train()
    return {
        **recorder.result(),
        "ds_config": ds_config,
        "params": _param_counts(model),
        "optim": str(getattr(args.optim, "value", args.optim)),
        "flops_breakdown": breakdown,
    }


# ---------------------------------------------------------------------------------------------------------------
# driver (parent process)


def summarize(raw: dict, warmup: int, steps: int) -> dict:
    """Throughput over the timed steps (warmup+1 .. warmup+steps) of one arm's raw record."""
    from training.flops import peak_flops_per_second

    per_step = raw["per_step"]
    timed = per_step[warmup : warmup + steps]
    durations = [s["duration_s"] for s in timed]
    elapsed = sum(durations)
    tokens = sum(s["tokens"] for s in timed)
    images = sum(s["images"] for s in timed)
    waits = sum(s["data_wait_s"] for s in timed)
    flops_per_step = (
        3.0 * raw["fwd_flops_first_micro_batch"] * raw["accum"]
        if raw.get("fwd_flops_first_micro_batch")
        else None
    )
    peak = peak_flops_per_second()
    tflops = flops_per_step * len(timed) / elapsed / 1e12 if flops_per_step else None
    return {
        "timed_steps": len(timed),
        "elapsed_s": elapsed,
        "tokens_per_s": tokens / elapsed,
        "images_per_s": images / elapsed,
        "samples_per_s": sum(s["samples"] for s in timed) / elapsed,
        "step_time_median_s": statistics.median(durations),
        "step_time_mean_s": elapsed / len(timed),
        "data_wait_s": waits,
        "data_loading_fraction": waits / elapsed,
        "peak_memory_bytes": raw["peak_memory_bytes"],
        "memory_kind": raw["memory_kind"],
        "flops_per_step": flops_per_step,
        "tflops": tflops,
        "mfu": tflops * 1e12 / peak if tflops and peak else None,
        "first_loss": raw["losses"][0] if raw["losses"] else None,
        "losses": raw["losses"],
        "flops_breakdown_first_micro_batch": raw.get("flops_breakdown"),
        "images_first_step": per_step[0]["images"],
        "images_per_step_mean": images / len(timed),
        "tokens_per_step_mean": tokens / len(timed),
    }


def device_name() -> str:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return f"{cpu_model() or 'CPU'} ({os.cpu_count()} cores)"


def environment() -> dict:
    import deepspeed
    import torch
    import transformers

    try:
        import accelerate

        accelerate_version = accelerate.__version__
    except ImportError:
        accelerate_version = None
    status = git("status", "--porcelain")
    return {
        "device": device_name(),
        "cuda": torch.cuda.is_available(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "deepspeed": deepspeed.__version__,
        "transformers": transformers.__version__,
        "accelerate": accelerate_version,
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "git_commit": git("rev-parse", "HEAD"),
        "git_dirty": bool(status) if status is not None else None,
        "load_average": list(os.getloadavg()),
        "torch_threads": torch.get_num_threads(),
        "ett_peak_tflops": os.environ.get("ETT_PEAK_TFLOPS"),
        "peak": _peak(),
    }


def _peak() -> dict:
    from training.flops import peak_info

    return peak_info()


def _arm_env(threads: int | None) -> dict:
    env = dict(os.environ)
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    env["PYTHONPATH"] = str(REPO_ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("PYTHONWARNINGS", "ignore")
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT", "ETT_BENCH_BATON"):
        env.pop(key, None)
    return env


def _arm_command(arm: str, spec_path: Path, out_path: Path) -> list[str]:
    return [sys.executable, "-m", "benchmarks.train_throughput", "--arm", arm, "--spec", str(spec_path), "--arm-out", str(out_path)]  # fmt: skip


def _arm_result(arm: str, returncode: int, out_path: Path, log_path: Path) -> dict:
    if returncode != 0:
        tail = log_path.read_text()[-4000:]
        raise SystemExit(f"train_throughput: the '{arm}' arm failed (exit {returncode}); log tail:\n{tail}")
    return json.loads(out_path.read_text())


def run_arm(arm: str, spec_path: Path, out_path: Path, log_path: Path, threads: int | None) -> dict:
    with open(log_path, "w") as log:
        proc = subprocess.run(
            _arm_command(arm, spec_path, out_path), cwd=REPO_ROOT, env=_arm_env(threads), stdout=log,
            stderr=subprocess.STDOUT,
        )  # fmt: skip
    return _arm_result(arm, proc.returncode, out_path, log_path)


def run_arms_interleaved(
    jobs: list[tuple[str, Path, Path, Path]], threads: int | None, block: int
) -> list[dict]:
    """Run the arms' processes at once, taking turns every `block` steps in the order of `jobs` (each arm's clock
    stops while it waits; its setup runs before its first turn). jobs: (arm, spec, out, log) per arm."""
    from training.engine import free_port

    procs = []
    for arm, spec_path, out_path, log_path in jobs:
        go_read, go_write = os.pipe()
        done_read, done_write = os.pipe()
        env = _arm_env(threads)
        env["ETT_BENCH_BATON"] = f"{go_read},{done_write},{block}"
        env["MASTER_PORT"] = str(free_port())
        log = open(log_path, "w")
        proc = subprocess.Popen(
            _arm_command(arm, spec_path, out_path), cwd=REPO_ROOT, env=env, stdout=log,
            stderr=subprocess.STDOUT, pass_fds=(go_read, done_write),
        )  # fmt: skip
        os.close(go_read)
        os.close(done_write)
        procs.append({"proc": proc, "log": log, "go": go_write, "done": done_read, "running": True})
    try:
        while any(p["running"] for p in procs):
            for p in procs:
                if not p["running"]:
                    continue
                os.write(p["go"], b"g")
                answer = os.read(p["done"], 1)  # b"" when the arm died
                p["running"] = answer == b"p"
    except BrokenPipeError:
        pass  # an arm died before its turn; its exit code says so below
    results = []
    for (arm, _, out_path, log_path), p in zip(jobs, procs):
        os.close(p["go"])
        os.close(p["done"])
        returncode = p["proc"].wait()
        p["log"].close()
        results.append(_arm_result(arm, returncode, out_path, log_path))
    return results


def _fmt(value, unit: str = "") -> str:
    if value is None:
        return "-"
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        value = float(value)
        if unit == "%":
            return f"{100 * value:.2f}%"
        if unit == "MiB":
            return f"{value / 2**20:.0f}"
        return f"{value:.4g}" if abs(value) < 1e5 else f"{value:,.0f}"
    return str(value)


def print_table(result: dict) -> None:
    ours, base, ratio = result["arms"].get("ours"), result["arms"].get("baseline"), result["ratios"]
    rows = [
        ("tokens/s", "tokens_per_s", ""),
        ("images/s", "images_per_s", ""),
        ("step time median (s)", "step_time_median_s", ""),
        ("peak memory (MiB)", "peak_memory_bytes", "MiB"),
        ("TFLOP/s", "tflops", ""),
        ("MFU", "mfu", "%"),
        ("data loading (% of step)", "data_loading_fraction", "%"),
        ("first loss", "first_loss", ""),
    ]
    print(f"\n{result['config']} on {result['env']['device']}: {result['setup']['timed_steps']} timed steps after "
          f"{result['setup']['warmup_steps']} warm-up, {result['setup']['precision']}")  # fmt: skip
    print(f"{'metric':<26} {'ours':>14} {'HF Trainer+DS':>14} {'ours/baseline':>14}")
    ratio_keys = {"tokens_per_s": "tokens_per_s", "images_per_s": "images_per_s", "peak_memory_bytes": "peak_memory", "step_time_median_s": "step_time"}  # fmt: skip
    for label, key, unit in rows:
        r = ratio.get(ratio_keys.get(key, ""), None)
        ours_value = ours[key] if ours else None
        base_value = base[key] if base and key != "data_loading_fraction" else None
        print(f"{label:<26} {_fmt(ours_value, unit):>14} {_fmt(base_value, unit):>14} {_fmt(r):>14}")
    if result["first_loss_abs_diff"] is not None:
        print(f"first losses equal: {result['first_loss_match']} (|diff| {result['first_loss_abs_diff']:.2e}); "
              f"same batches: {result['same_batches']}")  # fmt: skip


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.train_throughput",
        description=__doc__.split("\n\n")[0],
        epilog="see the module docstring (python -c 'import benchmarks.train_throughput as m; print(m.__doc__)') "
        "for what each arm runs",
    )
    parser.add_argument("--config", choices=sorted(CONFIGS), default="tiny")
    parser.add_argument("--steps", type=int, default=None, help="timed steps (default: the config's)")
    parser.add_argument(
        "--warmup", type=int, default=None, help="untimed warm-up steps (default: the config's)"
    )
    parser.add_argument(
        "--repeats", type=int, default=1, help="alternate the two arms R times; keep the median"
    )
    parser.add_argument(
        "--interleave",
        type=int,
        default=None,
        metavar="K",
        help="run both arms at once, taking turns every K steps (each arm's clock stops while the other runs), so "
        "that the machine's drift falls on both; 0 runs them one after the other (default 5 on CPU, 0 on CUDA)",
    )
    parser.add_argument(
        "--json", dest="json_out", default=DEFAULT_JSON, help=f"output JSON (default {DEFAULT_JSON})"
    )
    parser.add_argument("--data", default=None, help="an existing data_pipeline.synthetic directory")
    parser.add_argument(
        "--workdir", default=None, help="where data, run directories and logs go (default: temp)"
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="CPU threads per arm (OMP_NUM_THREADS and torch.set_num_threads; default 1 on CPU, where a shared "
        "machine's other load makes multi-threaded timings erratic; untouched on CUDA)",
    )
    parser.add_argument(
        "--baseline-zero",
        nargs="*",
        default=[],
        metavar="KEY=VALUE",
        help="diagnostics: override the baseline's zero_optimization entries (e.g. reduce_bucket_size=50000000 to "
        "give it our bucket sizes); the JSON records them",
    )
    parser.add_argument(
        "overrides", nargs="*", help="config overrides for both arms, e.g. data.num_workers=2"
    )
    parser.add_argument(
        "--arms",
        choices=("both", "ours", "baseline"),
        default="both",
        help="which arms to run (default both; one arm leaves the ratios and cross-arm checks null)",
    )
    parser.add_argument("--arm", choices=("ours", "baseline"), help=argparse.SUPPRESS)
    parser.add_argument("--spec", help=argparse.SUPPRESS)
    parser.add_argument("--arm-out", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.arm:  # child process: one arm
        spec = json.loads(Path(args.spec).read_text())
        if spec.get("threads"):
            import torch

            torch.set_num_threads(spec["threads"])
        raw = (run_ours if args.arm == "ours" else run_baseline)(spec)
        raw["accum"] = spec["accum"]
        Path(args.arm_out).write_text(json.dumps(raw))
        return 0

    import torch

    preset = CONFIGS[args.config]
    if preset["needs_cuda"] and not torch.cuda.is_available():
        print(
            f"train_throughput: --config {args.config} needs a CUDA GPU (a ~1B LLM and the paper's tokenizer in bf16, "
            "sized for one H100/H200); this machine has none. Use --config tiny on CPU.",
            file=sys.stderr,
        )
        return 2
    threads = args.threads if args.threads is not None else (None if torch.cuda.is_available() else 1)
    overrides = list(args.overrides)
    if args.config == "gpu1b" and not any(o.startswith("train.") and "batch_size" in o for o in overrides):
        gib = torch.cuda.get_device_properties(0).total_memory / 2**30
        if gib < 100:  # 4 rows (~28 images at 256 px) need ~90-110 GB; 80-GB cards get 2 rows
            overrides += ["train.micro_batch_size=2", "train.global_batch_size=2"]
            print(f"{gib:.0f} GiB GPU: micro-batch 2 instead of 4 ({' '.join(overrides[-2:])})")
    baseline_zero = {}
    for item in args.baseline_zero:
        key, _, value = item.partition("=")
        baseline_zero[key] = json.loads(value) if value.strip() not in ("", "auto") else value
    warmup = preset["warmup"] if args.warmup is None else args.warmup
    steps = preset["steps"] if args.steps is None else args.steps
    if steps < 2 or warmup < 1:
        parser.error("--steps must be >= 2 and --warmup >= 1")
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="train_throughput-"))
    workdir.mkdir(parents=True, exist_ok=True)
    data_dir = Path(args.data) if args.data else workdir / "data"
    if not (data_dir / "caption_train").is_dir():
        from data_pipeline.synthetic import write_synthetic

        print(f"writing synthetic data to {data_dir}", flush=True)
        write_synthetic(data_dir, seed=0, num_train=preset["num_train"], num_eval=8)

    arm_names = ("ours", "baseline") if args.arms == "both" else (args.arms,)
    if torch.cuda.is_available() and not os.environ.get("ETT_PEAK_TFLOPS"):
        # Measure the matmul peak here, once, with the GPU idle, and hand it to both arms: an arm measuring it on
        # its own would do so at its first metrics log, inside the timed steps.
        from training.flops import peak_info

        peak = peak_info()
        if peak["flops_per_second"]:
            os.environ["ETT_PEAK_TFLOPS"] = repr(peak["flops_per_second"] / 1e12)
            print(
                f"bf16 matmul peak ({peak['source']}): {peak['flops_per_second'] / 1e12:.1f} TFLOP/s",
                flush=True,
            )
        torch.cuda.empty_cache()
    interleave = args.interleave if args.interleave is not None else (0 if torch.cuda.is_available() else 5)
    interleave = interleave if len(arm_names) == 2 else 0
    results: dict[str, list[dict]] = {arm: [] for arm in arm_names}
    for repeat in range(args.repeats):
        order = arm_names if repeat % 2 == 0 else arm_names[::-1]  # who goes first alternates
        jobs = []
        for arm in order:
            sections = stage_sections(
                args.config, data_dir, workdir / f"run_{arm}_{repeat}", overrides, warmup + steps
            )
            cfg = train_config(sections)
            accum = cfg.train.global_batch_size // cfg.train.micro_batch_size
            spec = {
                "sections": sections,
                "warmup": warmup,
                "steps": steps,
                "accum": accum,
                "threads": threads,
                "baseline_zero": baseline_zero,
            }
            spec_path = workdir / f"spec_{arm}_{repeat}.json"
            spec_path.write_text(json.dumps(spec))
            jobs.append(
                (arm, spec_path, workdir / f"raw_{arm}_{repeat}.json", workdir / f"log_{arm}_{repeat}.txt")
            )
        if interleave:
            print(
                f"[{repeat + 1}/{args.repeats}] {' and '.join(order)}, turns of {interleave} steps ...",
                flush=True,
            )
            raws_now = run_arms_interleaved(jobs, threads, interleave)
        else:
            raws_now = []
            for job in jobs:
                print(f"[{repeat + 1}/{args.repeats}] {job[0]} ...", flush=True)
                raws_now.append(run_arm(*job, threads))
        for (arm, *_), raw in zip(jobs, raws_now):
            summary = summarize(raw, warmup, steps)
            summary["raw"] = raw
            results[arm].append(summary)
            print(
                f"    {arm}: {summary['tokens_per_s']:.1f} tokens/s, {summary['images_per_s']:.2f} images/s",
                flush=True,
            )
        if len(arm_names) == 2:
            paired = results["ours"][-1]["tokens_per_s"] / results["baseline"][-1]["tokens_per_s"]
            print(f"    ours / baseline: {paired:.3f}", flush=True)

    def median_run(runs):
        return sorted(runs, key=lambda r: r["tokens_per_s"])[(len(runs) - 1) // 2]

    arms = {arm: median_run(runs) for arm, runs in results.items()}
    raws = {arm: run.pop("raw") for arm, run in arms.items()}
    for runs in results.values():
        for run in runs:
            run.pop("raw", None)
    ours, base = arms.get("ours"), arms.get("baseline")
    both = ours is not None and base is not None
    diff = abs(ours["first_loss"] - base["first_loss"]) if both else None
    same_batches = raws["ours"]["batch_hashes"] == raws["baseline"]["batch_hashes"] if both else None
    first = raws[arm_names[0]]

    def ratio(key):
        return ours[key] / base[key] if both else None

    result = {
        "benchmark": "train_throughput",
        "config": args.config,
        "command": " ".join(
            ["python -m benchmarks.train_throughput", *(argv if argv is not None else sys.argv[1:])]
        ),
        "env": environment(),
        "setup": {
            "warmup_steps": warmup,
            "timed_steps": steps,
            "repeats": args.repeats,
            "interleave_steps": interleave,
            "arms": list(arm_names),
            "precision": "bf16" if torch.cuda.is_available() else "fp32",
            "world_size": 1,
            "micro_batch_size": cfg.train.micro_batch_size,
            "gradient_accumulation_steps": accum,
            "seq_len": cfg.data.seq_len,
            "image_size": list(cfg.data.image_size),
            "data_num_workers": cfg.data.num_workers,
            "cpu_threads_per_arm": threads,
            "baseline_zero_overrides": baseline_zero,
            "log_every": cfg.train.log_every,
            "params": first["params"],
            "sections": stage_sections(args.config, data_dir, Path("RUN"), overrides, warmup + steps),
            "ds_config_ours": raws["ours"]["ds_config"] if "ours" in raws else None,
            "ds_config_baseline": raws["baseline"]["ds_config"] if "baseline" in raws else None,
            "optimizer_ours": "torch.optim.AdamW (training.engine.build_engine)",
            "optimizer_baseline": (
                f"TrainingArguments default optim={raws['baseline']['optim']}" if "baseline" in raws else None
            ),
            "flops_note": "3 x forward FLOPs of the first micro-batch (training/flops.py: FlopCounterMode plus the "
            "Triton codebook kernels), the same for both arms",
        },
        "arms": arms,
        "all_repeats": {
            arm: [{k: r[k] for k in ("tokens_per_s", "images_per_s", "step_time_median_s")} for r in runs]
            for arm, runs in results.items()
        },  # fmt: skip
        "ratio_per_repeat": [
            o["tokens_per_s"] / b["tokens_per_s"] for o, b in zip(results["ours"], results["baseline"])
        ]
        if both
        else None,
        "ratios": {
            "tokens_per_s": ratio("tokens_per_s"),
            "images_per_s": ratio("images_per_s"),
            "step_time": ratio("step_time_median_s"),
            "peak_memory": ratio("peak_memory_bytes"),
        },
        "first_loss_ours": ours["first_loss"] if ours else None,
        "first_loss_baseline": base["first_loss"] if base else None,
        "first_loss_abs_diff": diff,
        "first_loss_match": diff
        <= (1e-3 if torch.cuda.is_available() else 1e-5) * max(1.0, abs(base["first_loss"]))
        if both
        else None,
        "same_batches": same_batches,
        "data_loading_fraction_ours": ours["data_loading_fraction"] if ours else None,
        "targets": {
            "throughput_ratio_min": 1.2,
            "throughput_ratio_met": ratio("tokens_per_s") >= 1.2 if both else None,
            "data_loading_fraction_max": 0.02,
            "data_loading_met": ours["data_loading_fraction"] <= 0.02 if ours else None,
            "mfu_min_gpu1b": 0.40,
            "mfu_met": (ours["mfu"] >= 0.40)
            if ours and ours["mfu"] is not None and args.config == "gpu1b"
            else None,
        },
        "workdir": str(workdir) if args.workdir else None,
    }
    print_table(result)
    out = Path(args.json_out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {out}")
    if not args.workdir:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0 if same_batches is not False else 1


if __name__ == "__main__":
    sys.exit(main())
