"""DeepSpeed engine construction: distributed init, the resolved ds_config, parameter groups, optimizer and schedule.

One engine per stage (docs/design.md): the trainable set is fixed before `deepspeed.initialize`, because ZeRO-3
builds its flat fp32 partitions only for parameters that require grad at that moment (flipping `requires_grad` on a
live engine is a silent no-op).

The optimizer is torch AdamW handed to DeepSpeed as a client optimizer (its fused multi-tensor kernel on CUDA): it
resumes bit for bit, unlike DeepSpeed's FusedAdam/CPUAdam, which recompute the bias-correction product differently
after a load.
"""

from __future__ import annotations

import copy
import json
import math
import os
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from training.config import ConfigError
from training.run_config import TrainConfig


def init_distributed() -> tuple[int, int, int]:
    """Initialise torch.distributed from the launcher's environment (deepspeed, torchrun, SLURM via our sbatch, or
    a single plain-python process). Returns (rank, local_rank, world_size). gloo on CPU, nccl on CUDA."""
    import deepspeed

    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    os.environ.setdefault("LOCAL_RANK", "0")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    if "MASTER_PORT" not in os.environ:
        os.environ["MASTER_PORT"] = str(free_port())
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if not dist.is_initialized():
        deepspeed.init_distributed(dist_backend=backend)
    local_rank = int(os.environ["LOCAL_RANK"])
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
    return dist.get_rank(), local_rank, dist.get_world_size()


def all_reduce_host(tensor: torch.Tensor, op=dist.ReduceOp.SUM) -> torch.Tensor:
    """All-reduce a small host (CPU) tensor in place and return it; a no-op without a process group or with one
    process (a gloo all-reduce costs ~0.1-0.4 ms even then, three times a step). NCCL has no CPU
    path, so under NCCL the values travel through the current CUDA device and are copied back."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return tensor
    if dist.get_backend() == "nccl":
        on_device = tensor.to(torch.device("cuda", torch.cuda.current_device()))
        dist.all_reduce(on_device, op=op)
        tensor.copy_(on_device.cpu())
    else:
        dist.all_reduce(tensor, op=op)
    return tensor


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (the OS picks it)."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def use_bf16(cfg: TrainConfig) -> bool:
    """precision=auto means bf16 on GPU, fp32 on CPU."""
    if cfg.train.precision == "auto":
        return torch.cuda.is_available()
    return cfg.train.precision == "bf16"


REPO_ROOT = Path(__file__).resolve().parents[1]
DS_CONFIG_DIR = REPO_ROOT / "ds_configs"


def resolve_ds_config_path(config: str) -> Path:
    """Where `deepspeed.config` is: an absolute path as given; a relative one against the working directory first,
    then against the repository's ds_configs/ (so the default "ds_configs/zero3.json", or plain "zero3.json",
    works from any directory). ConfigError naming every place looked in when none has the file."""
    path = Path(config)
    candidates = [path] if path.is_absolute() else [Path.cwd() / path]
    if not path.is_absolute():
        inside = path.relative_to("ds_configs") if path.parts[:1] == ("ds_configs",) else path
        candidates.append(DS_CONFIG_DIR / inside)
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    raise ConfigError(
        f"deepspeed.config: file not found: {config} (looked in {' and '.join(str(c) for c in candidates)})"
    )


def build_ds_config(cfg: TrainConfig, world_size: int, load_universal: bool = False) -> dict:
    """Read `cfg.deepspeed.config` (found by resolve_ds_config_path) and fill every "auto" field from our config."""
    path = resolve_ds_config_path(cfg.deepspeed.config)
    ds = json.loads(path.read_text())
    per_step = cfg.train.micro_batch_size * world_size
    if cfg.train.global_batch_size % per_step:
        raise ConfigError(
            f"train.global_batch_size={cfg.train.global_batch_size} must be a multiple of "
            f"train.micro_batch_size x world size = {cfg.train.micro_batch_size} x {world_size}"
        )
    filled = {
        "train_batch_size": cfg.train.global_batch_size,
        "train_micro_batch_size_per_gpu": cfg.train.micro_batch_size,
        "gradient_accumulation_steps": cfg.train.global_batch_size // per_step,
        "gradient_clipping": cfg.optim.grad_clip,
    }
    for key, value in filled.items():
        if ds.get(key, "auto") == "auto":
            ds[key] = value
    ds.setdefault("bf16", {})
    if ds["bf16"].get("enabled", "auto") == "auto":
        ds["bf16"]["enabled"] = use_bf16(cfg)
    zero = ds.setdefault("zero_optimization", {})
    if cfg.deepspeed.zero_stage is not None:
        zero["stage"] = cfg.deepspeed.zero_stage
    auto_zero = {
        "reduce_bucket_size": cfg.deepspeed.reduce_bucket_size,
        "stage3_prefetch_bucket_size": cfg.deepspeed.reduce_bucket_size,
        "stage3_param_persistence_threshold": cfg.deepspeed.param_persistence_threshold,
    }
    for key, value in auto_zero.items():
        if zero.get(key) == "auto":
            zero[key] = value
    if zero.get("stage", 0) < 3:
        for key in list(zero):
            if key.startswith("stage3_"):
                del zero[key]
    if load_universal:
        ds.setdefault("checkpoint", {})["load_universal"] = True
    leftover = [k for k, v in _walk(ds) if v == "auto"]
    if leftover:
        raise ConfigError(f"{path}: fields left as 'auto' that this trainer cannot fill: {leftover}")
    return ds


def _walk(tree: dict, prefix: str = ""):
    for key, value in tree.items():
        if isinstance(value, dict):
            yield from _walk(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


def zero_stage(ds_config: dict) -> int:
    return int(ds_config.get("zero_optimization", {}).get("stage", 0))


def build_param_groups(model: nn.Module, cfg: TrainConfig) -> list[dict]:
    """Trainable parameters grouped by name prefix (cfg.optim.param_groups; first match wins), each split into a
    decayed group and a no-decay group (biases, norms, 1-D parameters, embeddings' codebooks are decayed like weights).
    Groups carry their own lr; the schedule scales every group's lr by the same factor."""
    specs = list(cfg.optim.param_groups)
    buckets: dict[tuple[int, bool], list[nn.Parameter]] = {}
    names: dict[tuple[int, bool], list[str]] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        index = next((i for i, spec in enumerate(specs) if name.startswith(spec.prefix)), len(specs))
        shape = getattr(param, "ds_shape", param.shape)
        no_decay = len(shape) < 2 or "norm" in name
        buckets.setdefault((index, no_decay), []).append(param)
        names.setdefault((index, no_decay), []).append(name)
    groups = []
    for (index, no_decay), params in sorted(buckets.items(), key=lambda kv: kv[0]):
        spec = specs[index] if index < len(specs) else None
        lr = spec.lr if spec is not None and spec.lr is not None else cfg.optim.lr
        wd = (
            spec.weight_decay
            if spec is not None and spec.weight_decay is not None
            else cfg.optim.weight_decay
        )
        label = spec.prefix if spec is not None else "default"
        groups.append(
            {
                "params": params,
                "lr": lr,
                "weight_decay": 0.0 if no_decay else wd,
                "name": f"{label}{'/no_decay' if no_decay else ''}",
            }
        )
    if not groups:
        raise ConfigError(f"stage.kind={cfg.stage.kind}: the model has no trainable parameters")
    return groups


def lr_lambda(cfg: TrainConfig):
    """Warm-up (linear, warmup_ratio x max_steps) then cosine decay to min_lr_ratio, or constant."""
    total = cfg.schedule.max_steps
    warmup = max(1, int(round(cfg.schedule.warmup_ratio * total))) if cfg.schedule.warmup_ratio > 0 else 0
    floor = cfg.schedule.min_lr_ratio

    def factor(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        if cfg.schedule.kind == "constant":
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor


def build_engine(model: nn.Module, cfg: TrainConfig, ds_config: dict):
    """deepspeed.initialize with torch AdamW over our parameter groups and a LambdaLR schedule.
    Returns (engine, optimizer, scheduler)."""
    import deepspeed

    groups = build_param_groups(model, cfg)
    optimizer = torch.optim.AdamW(
        [{k: v for k, v in g.items() if k != "name"} for g in groups],
        lr=cfg.optim.lr,
        betas=cfg.optim.betas,
        eps=cfg.optim.eps,
        weight_decay=cfg.optim.weight_decay,
        # CUDA: the fused kernel. CPU: the multi-tensor (foreach) path, bitwise the per-parameter loop's result
        # and ~1.6x faster over the tokenizer's ~100 small tensors (torch picks the loop on CPU by default).
        fused=torch.cuda.is_available(),
        foreach=not torch.cuda.is_available(),
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg))
    engine, optimizer, _, scheduler = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=scheduler, config=copy.deepcopy(ds_config)
    )
    return engine, optimizer, scheduler


def model_init_context(ds_config: dict):
    """`deepspeed.zero.Init` under ZeRO-3 (parameters are partitioned as they are created), else a no-op."""
    import contextlib

    import deepspeed

    if zero_stage(ds_config) == 3:
        return deepspeed.zero.Init(config_dict_or_path=ds_config)
    return contextlib.nullcontext()


def load_full_state_dict(
    model: nn.Module, state_dict: dict[str, torch.Tensor], strict_prefixes: tuple[str, ...] = ()
) -> list[str]:
    """Copy full (unsharded) tensors into `model`, which may be partitioned by zero.Init. Must run on every rank,
    before deepspeed.initialize (after it, writes through GatheredParameters are lost: ZeRO-3 keeps its own fp32 master copy).
    Returns the names of model parameters/buffers that the state dict did not provide."""
    import deepspeed

    missing = []
    persistent = set(model.state_dict().keys())
    for module_name, module in model.named_modules():
        prefix = f"{module_name}." if module_name else ""
        params = list(module.named_parameters(recurse=False))
        buffers = [(n, b) for n, b in module.named_buffers(recurse=False) if prefix + n in persistent]
        if not params and not buffers:
            continue
        gathered = [p for _, p in params if hasattr(p, "ds_id")]
        with deepspeed.zero.GatheredParameters(gathered, modifier_rank=0, enabled=bool(gathered)):
            for name, tensor in params + buffers:
                key = prefix + name
                if key not in state_dict:
                    missing.append(key)
                    continue
                source = state_dict[key]
                if tuple(source.shape) != tuple(tensor.shape):
                    raise ConfigError(
                        f"weight '{key}': shape {tuple(source.shape)} in the file, {tuple(tensor.shape)} in the model"
                    )
                with torch.no_grad():
                    tensor.copy_(source.to(tensor.dtype))
    bad = [m for m in missing if m.startswith(strict_prefixes)] if strict_prefixes else []
    if bad:
        raise ConfigError(f"weights missing for {len(bad)} tensors, e.g. {bad[:5]}")
    return missing


def gather_full_state_dict(model: nn.Module, rank: int) -> dict[str, torch.Tensor]:
    """Full fp32-or-native tensors of every parameter and persistent buffer, gathered module by module so that at
    most one module is unsharded at a time. Every rank must call it; only rank 0 gets the tensors (others get {})."""
    import deepspeed

    out: dict[str, torch.Tensor] = {}
    persistent = set(model.state_dict().keys())
    for module_name, module in model.named_modules():
        prefix = f"{module_name}." if module_name else ""
        params = list(module.named_parameters(recurse=False))
        gathered = [p for _, p in params if hasattr(p, "ds_id")]
        with deepspeed.zero.GatheredParameters(gathered, enabled=bool(gathered)):
            if rank == 0:
                for name, param in params:
                    out[prefix + name] = param.detach().to("cpu", copy=True)
        if rank == 0:
            for name, buffer in module.named_buffers(recurse=False):
                if prefix + name in persistent:
                    out[prefix + name] = buffer.detach().to("cpu", copy=True)
    return out
