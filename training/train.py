"""Train one stage: `python -m training.train --config STAGE.yaml [section.key=value ...] [--resume auto|PATH|none]`.

Works as plain python (one process), under torchrun, and under the deepspeed launcher (which adds --local_rank).
The stage kind (stage.kind) decides the objective and the trainable set; see modeling/ett.py and training/stages.py.
Exit codes: 0 done, 75 preempted (saved; requeue and resume with --resume auto), 2 bad configuration.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from training import checkpoint as ckpt
from training import preemption
from training.config import ConfigError, load_config, save_config, to_dict
from training.engine import all_reduce_host
from training.run_config import TrainConfig
from training.run_log import RunLogger, get_logger

EPILOG = """examples:
  python -m training.train --config training/recipes/stage2_ett.yaml optim.lr=1e-4 schedule.max_steps=200
  torchrun --nproc_per_node 2 -m training.train --config STAGE.yaml --resume auto
  deepspeed --num_gpus 8 -m training.train --config STAGE.yaml

exit codes: 0 finished, 75 preempted after saving (requeue with --resume auto), 2 configuration error,
            3 too many consecutive non-finite steps."""


class NonFiniteError(RuntimeError):
    pass


def parse_args(argv=None) -> argparse.Namespace:
    from training.config import describe_fields

    keys = "\n".join(describe_fields(TrainConfig))
    parser = argparse.ArgumentParser(
        prog="python -m training.train",
        description="Train one ETT stage (tokenizer pretraining, LLM pretraining, alignment, ETT, chat SFT or "
        "text-to-image) with DeepSpeed ZeRO-3. Any config field can be overridden as section.key=value.",
        epilog=f"{EPILOG}\n\nconfig keys (section: key=default), overridable as section.key=value:\n{keys}",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--config", required=True, help="stage YAML file (see training/recipes/)")
    parser.add_argument(
        "--resume",
        default=None,
        help="auto: newest complete checkpoint of this stage (default: checkpoint.resume in the config); "
        "PATH: a checkpoint directory; none: start fresh",
    )
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument(
        "overrides", nargs="*", help="config overrides, e.g. optim.lr=1e-4 train.micro_batch_size=2"
    )
    return parser.parse_args(argv)


def seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _reduce_mean(values: dict[str, float], world_size: int) -> dict[str, float]:
    """Average scalar metrics over ranks (one all-reduce)."""
    if world_size == 1 or not values:
        return values
    keys = sorted(values)
    tensor = all_reduce_host(torch.tensor([values[k] for k in keys], dtype=torch.float64))
    return {k: float(v) / world_size for k, v in zip(keys, tensor.tolist())}


def _accumulate(terms: dict, new: dict, accum: int, device: torch.device) -> None:
    """terms[k] += new[k] / accum, in fp64 on the device: the step's metrics reach the host in one copy per step
    (the same values as accumulating Python floats, without a host sync per term and micro-batch)."""
    for key, value in new.items():
        value = torch.as_tensor(value, device=device).detach().double() / accum
        terms[key] = terms[key] + value if key in terms else value


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        cfg = load_config(TrainConfig, args.config, args.overrides)
    except ConfigError as exc:
        print(f"configuration error: {exc}", file=sys.stderr)
        return 2
    try:
        return run_stage(cfg, args.resume or cfg.checkpoint.resume)
    except (ConfigError, ckpt.CheckpointError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except NonFiniteError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 3


def build_stage(
    cfg: TrainConfig,
    ds_config: dict,
    rank: int,
    local_rank: int,
    world_size: int,
    fresh: bool = True,
    seed: int | None = None,
):
    """What a stage trains with, built as every run builds it: the model (seeded with `seed`, default
    cfg.train.seed; under zero.Init for ZeRO-3, external parameters registered; the stage's initial weights when
    `fresh`, i.e. no checkpoint will be loaded), the discriminator, the DeepSpeed engine and the data loader.
    Returns (engine, scheduler, loader, discriminator state or None)."""
    from training.data import build_train_loader
    from training.engine import build_engine, model_init_context, zero_stage
    from training.stages import (
        build_discriminator,
        build_model,
        load_initial_weights,
        register_zero3_external_parameters,
    )

    seed_all(cfg.train.seed if seed is None else seed)
    with model_init_context(ds_config):
        model = build_model(cfg)
    if zero_stage(ds_config) == 3:
        register_zero3_external_parameters(model)
    if fresh:
        load_initial_weights(model, cfg)
    disc_state = build_discriminator(cfg, model, _device(local_rank))
    engine, _, scheduler = build_engine(model, cfg, ds_config)
    return engine, scheduler, build_train_loader(cfg, rank, world_size), disc_state


def run_stage(cfg: TrainConfig, resume: str) -> int:
    from training.engine import build_ds_config, init_distributed
    from training.stages import stage_model_inputs, write_handoff

    rank, local_rank, world_size = init_distributed()
    log = get_logger(rank)
    run_dir = Path(cfg.train.output_dir)
    ckpt_root = run_dir / "checkpoints"
    if rank == 0:
        save_config(cfg, run_dir / "config.yaml")
    preemption.install_handlers()

    point = ckpt.resolve_resume(resume, ckpt_root)
    if point is not None and point.trainer_state.get("fingerprint") != cfg.fingerprint():
        raise ckpt.CheckpointError(
            f"{point.path}: written by a different model configuration or stage (fingerprint "
            f"{point.trainer_state.get('fingerprint')} != {cfg.fingerprint()}); use --resume none or the original config"
        )
    world_changed = point is not None and point.trainer_state["world_size"] != world_size
    load_tag = point.tag if point is not None else None
    if world_changed:
        load_tag = _convert_to_universal(point, rank)
        log.warning(
            f"resuming a {point.trainer_state['world_size']}-process checkpoint on {world_size} processes through "
            f"DeepSpeed's universal checkpoint ({load_tag})"
        )
    ds_config = build_ds_config(cfg, world_size, load_universal=world_changed)
    engine, scheduler, loader, disc_state = build_stage(
        cfg, ds_config, rank, local_rank, world_size, fresh=point is None
    )

    step, consumed_samples, consumed_tokens = 0, 0, 0
    if point is not None:
        engine.load_checkpoint(str(point.root), tag=load_tag, load_module_strict=True)
        state = point.trainer_state
        step, consumed_samples, consumed_tokens = (
            state["step"],
            state["consumed_samples"],
            state["consumed_tokens"],
        )
        loader.load_state_dict(state["data"])
        rank_state = point.rank_state(rank) if not world_changed else None
        if rank_state is not None:
            ckpt.restore_rng_state(rank_state["rng"])
        if disc_state is not None:
            disc_state.load(point.path)
        log.info(f"resumed from {point.path} at step {step} ({consumed_samples} samples)")

    manager = ckpt.CheckpointManager(ckpt_root, rank, world_size, keep_last=cfg.checkpoint.keep_last)
    run_log = RunLogger(
        run_dir,
        rank=rank,
        total_steps=cfg.schedule.max_steps,
        initial_step=step,
        desc=cfg.stage.name,
        progress=cfg.train.progress,
    )
    accum = engine.gradient_accumulation_steps()
    flops_per_step = None
    window: dict[str, list[float]] = {}
    window_start, window_steps, window_samples, window_tokens = time.time(), 0, 0, 0
    nonfinite_streak = 0
    exit_code = 0
    kind = cfg.stage.kind

    def save(at_step: int) -> None:
        data_state = loader.state_dict()
        trainer_state = {
            "step": at_step,
            "consumed_samples": consumed_samples,
            "consumed_tokens": consumed_tokens,
            "stage": cfg.stage.name,
            "kind": kind,
            "fingerprint": cfg.fingerprint(),
            "data": data_state,
            "config": to_dict(cfg),
        }
        rank_state = {"rng": ckpt.capture_rng_state()}
        path = manager.save(
            engine, at_step, trainer_state, rank_state, rank0_extra=disc_state.save if disc_state else None
        )
        log.info(f"saved checkpoint {path}")

    # The loader yields CPU tensors; the engine computes on its device, in bf16 when DeepSpeed's bf16 is on.
    input_dtype = (
        torch.bfloat16 if engine.bfloat16_enabled() else torch.float16 if engine.fp16_enabled() else None
    )
    engine.train()
    while step < cfg.schedule.max_steps:
        device_terms: dict[str, torch.Tensor] = {}
        step_samples = step_tokens = 0
        for _ in range(accum):
            batch = next(loader)
            inputs = stage_model_inputs(batch, kind, engine.device, input_dtype)
            disc = disc_state.discriminator if disc_state is not None else None
            if flops_per_step is None:
                from training.flops import count_forward_flops

                fwd, out = count_forward_flops(engine, inputs, kind=kind, discriminator=disc, step=step)
                flops_per_step = 3.0 * fwd * accum * world_size
            else:
                out = engine(inputs, kind=kind, discriminator=disc, step=step)
            engine.backward(out.loss)
            if disc_state is not None and disc_state.update is not None and out.reconstruction is not None:
                disc_terms = disc_state.update.step(inputs["images"], out.reconstruction, step)
                _accumulate(device_terms, disc_terms, accum, engine.device)
            engine.step()
            _accumulate(device_terms, {"loss/total": out.loss, **out.terms}, accum, engine.device)
            if out.token_count is not None:
                count = out.token_count.double()
                accuracy = torch.where(count > 0, out.token_correct.double() / count.clamp(min=1), 0.0)
                _accumulate(device_terms, {"acc/token": accuracy}, accum, engine.device)
            step_samples += int(batch.get("num_samples", 0))
            step_tokens += int(batch.get("num_tokens", 0))
        step_terms = dict(zip(device_terms, torch.stack(list(device_terms.values())).tolist()))
        step += 1
        totals = all_reduce_host(torch.tensor([step_samples, step_tokens], dtype=torch.int64))
        consumed_samples += int(totals[0])
        consumed_tokens += int(totals[1])
        grad_norm = engine.get_global_grad_norm()
        finite = math.isfinite(step_terms["loss/total"]) and (
            grad_norm is None or math.isfinite(float(grad_norm))
        )
        finite_all = all_reduce_host(
            torch.tensor([0 if finite else 1], dtype=torch.int32), op=dist.ReduceOp.MAX
        )
        if int(finite_all):
            nonfinite_streak += 1
            bad_terms = [k for k, v in step_terms.items() if not math.isfinite(v)] or ["gradient norm"]
            log.warning(
                f"step {step}: non-finite {bad_terms}; the update was skipped ({nonfinite_streak} in a row)"
            )
            run_log.metrics(step, {"skipped/nonfinite": 1.0}, postfix=False)
            if nonfinite_streak > cfg.train.max_consecutive_nonfinite:
                raise NonFiniteError(
                    f"{nonfinite_streak} consecutive non-finite steps, the last at step {step} "
                    f"(non-finite: {', '.join(bad_terms)}); lower optim.lr or check the data"
                )
        else:
            nonfinite_streak = 0
        for key, value in step_terms.items():
            window.setdefault(key, []).append(value)
        window_steps += 1
        window_samples += int(totals[0])
        window_tokens += int(totals[1])
        run_log.advance()
        if step % cfg.train.log_every == 0 or step == cfg.schedule.max_steps:
            elapsed = max(time.time() - window_start, 1e-9)
            metrics = _reduce_mean({k: sum(v) / len(v) for k, v in window.items()}, world_size)
            metrics["lr"] = scheduler.get_last_lr()[0]
            metrics["grad_norm"] = float(grad_norm) if grad_norm is not None else float("nan")
            metrics["perf/samples_per_s"] = window_samples / elapsed
            metrics["perf/tokens_per_s"] = window_tokens / elapsed
            if flops_per_step:
                from training.flops import mfu

                metrics["perf/tflops"] = flops_per_step * window_steps / elapsed / 1e12
                value = mfu(flops_per_step, elapsed / window_steps)
                if value is not None:
                    metrics["perf/mfu"] = value
            metrics["progress/consumed_samples"] = consumed_samples
            run_log.metrics(step, metrics)
            window, window_start, window_steps, window_samples, window_tokens = {}, time.time(), 0, 0, 0
        if cfg.train.eval_every and step % cfg.train.eval_every == 0:
            from training.evaluate import evaluate_during_training

            evaluate_during_training(
                engine.module, cfg, step, run_log, rank, world_size, engine.device, input_dtype
            )
            engine.train()
        if preemption.stop_requested():
            log.warning(
                f"received {preemption.received_signal() or 'a stop signal'}: saving at step {step} and exiting"
            )
            save(step)
            preemption.ignore_further_signals()
            exit_code = preemption.PREEMPTED_EXIT_CODE
            break
        if (
            cfg.checkpoint.save_every
            and step % cfg.checkpoint.save_every == 0
            and step < cfg.schedule.max_steps
        ):
            save(step)
    else:
        save(step)
        provenance = {
            "stage": cfg.stage.name,
            "kind": kind,
            "step": step,
            "consumed_samples": consumed_samples,
        }
        write_handoff(
            engine.module,
            cfg,
            run_dir / "final",
            provenance,
            rank,
            discriminator=disc_state.discriminator if disc_state is not None else None,
        )
        if rank == 0:
            (run_dir / "DONE").write_text(json.dumps(provenance))
    run_log.close()
    if dist.is_initialized():
        dist.barrier()
    return exit_code


def _device(local_rank: int) -> torch.device:
    return torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")


def _convert_to_universal(point: ckpt.ResumePoint, rank: int) -> str:
    """Convert a ZeRO checkpoint to DeepSpeed's universal format (rank 0), for a world-size change."""
    tag = point.tag + "_universal"
    target = point.root / tag
    if rank == 0 and not (target / "zero").is_dir():
        from deepspeed.checkpoint.ds_to_universal import main as ds_to_universal
        from deepspeed.checkpoint.ds_to_universal import parse_arguments

        saved = sys.argv
        sys.argv = ["ds_to_universal", "--input_folder", str(point.path), "--output_folder", str(target)]
        try:
            ds_to_universal(parse_arguments())
        finally:
            sys.argv = saved
    if dist.is_initialized():
        dist.barrier()
    return tag


if __name__ == "__main__":
    sys.exit(main())
