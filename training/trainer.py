"""The Trainer of one stage: build from the config, resume, step, evaluate, save, hand off.

    trainer = Trainer(cfg)          # distributed init, logger
    trainer.setup(resume="auto")    # engine, loader, loss modules; loads the newest complete checkpoint
    trainer.train_step()            # one optimizer step (gradient accumulation included) -> its metrics
    trainer.fit()                   # the loop: logging, evaluation, periodic saves, preemption, hand-off

A step is megatron-style: `forward_step` runs the model (the DeepSpeed engine) on the stage's batch keys, the
stage's objective (training/objectives.py, chosen by the StageSpec) turns the outputs into the loss, then backward,
the discriminator update (IBQ order: before the tokenizer's step) and the engine step. `TrainState` is everything a
checkpoint adds to the engine's own files: the counters, the data reader's state, the RNG and the discriminator.
Subclasses may override `build_loader` (the benchmarks wrap it to time data loading).
"""

from __future__ import annotations

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
from training.config import save_config, to_dict
from training.engine import all_reduce_host
from training.objectives import StepOutput
from training.run_config import TrainConfig
from training.run_log import RunLogger, get_logger
from training.stages import model_inputs, stage_spec


class NonFiniteError(RuntimeError):
    pass


def seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


class TrainState:
    """What a checkpoint holds besides the engine's files: step, consumed samples and tokens, the data reader's
    global state, each rank's RNG and, when the stage has one, the discriminator (rank 0's files) with its
    per-rank LeCAM EMAs."""

    def __init__(self, cfg: TrainConfig, loader, discriminator) -> None:
        self.cfg = cfg
        self.loader = loader
        self.discriminator = discriminator
        self.step = 0
        self.consumed_samples = 0
        self.consumed_tokens = 0

    def state_dict(self) -> dict:
        """rank 0's JSON state (written as trainer_state.json)."""
        return {
            "step": self.step,
            "consumed_samples": self.consumed_samples,
            "consumed_tokens": self.consumed_tokens,
            "stage": self.cfg.stage.name,
            "kind": self.cfg.stage.kind,
            "fingerprint": self.cfg.fingerprint(),
            "data": self.loader.state_dict(),
            "config": to_dict(self.cfg),
        }

    def rank_state(self) -> dict:
        state = {"rng": ckpt.capture_rng_state()}
        if self.discriminator is not None:
            state["lecam"] = self.discriminator.rank_state()
        return state

    def load(self, point: ckpt.ResumePoint, rank: int, same_world: bool) -> None:
        state = point.trainer_state
        self.step, self.consumed_samples = state["step"], state["consumed_samples"]
        self.consumed_tokens = state["consumed_tokens"]
        self.loader.load_state_dict(state["data"])
        rank_state = point.rank_state(rank) if same_world else None
        if rank_state is not None:
            ckpt.restore_rng_state(rank_state["rng"])
        if self.discriminator is not None:
            self.discriminator.load(point.path)
            if rank_state is not None and "lecam" in rank_state:
                self.discriminator.load_rank_state(rank_state["lecam"])


class MetricsWindow:
    """Step metrics since the last log line: per-term lists, steps, samples and tokens, wall time."""

    def __init__(self) -> None:
        self.terms: dict[str, list[float]] = {}
        self.steps = self.samples = self.tokens = 0
        self.start = time.time()

    def add(self, terms: dict[str, float], samples: int, tokens: int) -> None:
        for key, value in terms.items():
            self.terms.setdefault(key, []).append(value)
        self.steps += 1
        self.samples += samples
        self.tokens += tokens

    def means(self) -> dict[str, float]:
        return {k: sum(v) / len(v) for k, v in self.terms.items()}


def _accumulate(terms: dict, new: dict, accum: int, device: torch.device) -> None:
    """terms[k] += new[k] / accum, in fp64 on the device: the step's metrics reach the host in one copy per step
    (the same values as accumulating Python floats, without a host sync per term and micro-batch)."""
    for key, value in new.items():
        value = torch.as_tensor(value, device=device).detach().double() / accum
        terms[key] = terms[key] + value if key in terms else value


def _reduce_mean(values: dict[str, float], world_size: int) -> dict[str, float]:
    """Average scalar metrics over ranks (one all-reduce)."""
    if world_size == 1 or not values:
        return values
    keys = sorted(values)
    tensor = all_reduce_host(torch.tensor([values[k] for k in keys], dtype=torch.float64))
    return {k: float(v) / world_size for k, v in zip(keys, tensor.tolist())}


def _device(local_rank: int) -> torch.device:
    return torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")


class Trainer:
    def __init__(self, cfg: TrainConfig) -> None:
        from training.engine import init_distributed

        self.cfg = cfg
        self.spec = stage_spec(cfg)
        self.rank, self.local_rank, self.world_size = init_distributed()
        self.log = get_logger(self.rank)
        self.run_dir = Path(cfg.train.output_dir)
        self.forward_flops: int | None = None  # of the first micro-batch, counted once
        self.flops_per_step: float | None = None

    # ---- building ----------------------------------------------------------------------------------------------
    def setup(self, resume: str = "auto") -> None:
        """Build the engine, loss modules and loader, then load `resume` (auto | PATH | none) if it names a
        complete checkpoint. ZeRO-3 partitions the model while it is built; the stage's starting weights are
        loaded only when no checkpoint will be."""
        from training.engine import build_ds_config

        if self.rank == 0:
            save_config(self.cfg, self.run_dir / "config.yaml")
        preemption.install_handlers()
        point = self.resume_point(resume)
        world_changed = point is not None and point.trainer_state["world_size"] != self.world_size
        self.build(
            build_ds_config(self.cfg, self.world_size, load_universal=world_changed), fresh=point is None
        )
        if point is not None:
            self.load(point, world_changed)
        self.checkpoints = ckpt.CheckpointManager(
            self.run_dir / "checkpoints", self.rank, self.world_size, keep_last=self.cfg.checkpoint.keep_last
        )

    def build(self, ds_config: dict, fresh: bool = True, seed: int | None = None) -> None:
        """The model (seeded with `seed`, default train.seed; under zero.Init for ZeRO-3, external parameters
        registered, the stage's initial weights when `fresh`), the loss modules, the engine, the loader and a
        fresh TrainState, for the resolved DeepSpeed config `ds_config`."""
        from training.engine import build_engine, model_init_context, zero_stage
        from training.stages import (
            build_loss_modules,
            build_model,
            load_initial_weights,
            register_zero3_external_parameters,
            set_zero3_blocks,
        )

        self.ds_config = ds_config
        seed_all(self.cfg.train.seed if seed is None else seed)
        with model_init_context(ds_config):
            model = build_model(self.cfg)
        if zero_stage(self.ds_config) == 3:
            register_zero3_external_parameters(model)
            set_zero3_blocks(model)
        if fresh:
            load_initial_weights(model, self.cfg)
        self.losses, self.discriminator = build_loss_modules(self.cfg, model, _device(self.local_rank))
        self.engine, _, self.scheduler = build_engine(model, self.cfg, self.ds_config)
        self.loader = self.build_loader()
        # The loader yields CPU tensors; the engine computes on its device, in bf16 when DeepSpeed's bf16 is on.
        engine = self.engine
        self.input_dtype = (
            torch.bfloat16 if engine.bfloat16_enabled() else torch.float16 if engine.fp16_enabled() else None
        )
        self.accum = engine.gradient_accumulation_steps()
        self.state = TrainState(self.cfg, self.loader, self.discriminator)

    def build_loader(self):
        from training.data import build_train_loader

        return build_train_loader(self.cfg, self.rank, self.world_size)

    # ---- checkpoints ---------------------------------------------------------------------------------------
    def resume_point(self, resume: str) -> ckpt.ResumePoint | None:
        """The checkpoint `resume` (auto | PATH | none) names, checked against this config's fingerprint."""
        point = ckpt.resolve_resume(resume, self.run_dir / "checkpoints")
        if point is not None and point.trainer_state.get("fingerprint") != self.cfg.fingerprint():
            raise ckpt.CheckpointError(
                f"{point.path}: written by a different model configuration or stage (fingerprint "
                f"{point.trainer_state.get('fingerprint')} != {self.cfg.fingerprint()}); use --resume none or "
                "the original config"
            )
        return point

    def load(self, point: ckpt.ResumePoint, world_changed: bool) -> None:
        tag = point.tag
        if world_changed:
            tag = _convert_to_universal(point, self.rank)
            self.log.warning(
                f"resuming a {point.trainer_state['world_size']}-process checkpoint on {self.world_size} processes "
                f"through DeepSpeed's universal checkpoint ({tag})"
            )
        self.engine.load_checkpoint(str(point.root), tag=tag, load_module_strict=True)
        self.state.load(point, self.rank, same_world=not world_changed)
        self.log.info(
            f"resumed from {point.path} at step {self.state.step} ({self.state.consumed_samples} samples)"
        )

    def save(self) -> Path:
        """Start the checkpoint of this step: blocks while the state is copied to host memory, the files are written
        in the background and published at a later step boundary (`checkpoints.poll`) or by `checkpoints.wait`."""
        state = self.state
        path = self.checkpoints.save(
            self.engine,
            state.step,
            state.state_dict(),
            state.rank_state(),
            rank0_extra=self.discriminator.save if self.discriminator is not None else None,
        )
        self.log.info(f"saving checkpoint {path} in the background")
        return path

    # ---- one step ------------------------------------------------------------------------------------------
    def forward_step(self, inputs: dict) -> StepOutput:
        """The model on one micro-batch, then the stage's objective on its outputs."""
        model_inputs = {k: inputs[k] for k in self.spec.model_keys if k in inputs}
        out = self.engine(**model_inputs, reconstruct=self.losses.vq_loss is not None)
        return self.spec.objective(out, inputs, self.losses, self.state.step)

    def train_step(self) -> dict[str, float]:
        """One optimizer step over `accum` micro-batches; returns the step's mean terms (host floats, one copy)."""
        engine, state, accum = self.engine, self.state, self.accum
        device_terms: dict[str, torch.Tensor] = {}
        samples = tokens = 0
        for _ in range(accum):
            batch = next(self.loader)
            inputs = model_inputs(batch, self.spec.batch_keys, engine.device, self.input_dtype)
            if self.flops_per_step is None:
                from training.flops import count_forward_flops

                self.forward_flops, out = count_forward_flops(self.forward_step, inputs)
                self.flops_per_step = 3.0 * self.forward_flops * accum * self.world_size
            else:
                out = self.forward_step(inputs)
            engine.backward(out.loss)
            update = self.discriminator.update if self.discriminator is not None else None
            if update is not None and out.reconstruction is not None:
                disc_terms = update.step(inputs["images"], out.reconstruction, state.step)
                _accumulate(device_terms, disc_terms, accum, engine.device)
            engine.step()
            _accumulate(device_terms, {"loss/total": out.loss, **out.terms}, accum, engine.device)
            if out.token_count is not None:
                count = out.token_count.double()
                accuracy = torch.where(count > 0, out.token_correct.double() / count.clamp(min=1), 0.0)
                _accumulate(device_terms, {"acc/token": accuracy}, accum, engine.device)
            samples += int(batch.get("num_samples", 0))
            tokens += int(batch.get("num_tokens", 0))
        terms = dict(zip(device_terms, torch.stack(list(device_terms.values())).tolist()))
        state.step += 1
        totals = all_reduce_host(torch.tensor([samples, tokens], dtype=torch.int64))
        self.step_samples, self.step_tokens = int(totals[0]), int(totals[1])
        state.consumed_samples += self.step_samples
        state.consumed_tokens += self.step_tokens
        return terms

    def check_finite(self, terms: dict[str, float], grad_norm, streak: int) -> int:
        """The number of non-finite steps in a row after this one (on any rank); raises past the limit."""
        finite = math.isfinite(terms["loss/total"]) and (grad_norm is None or math.isfinite(float(grad_norm)))
        flags = all_reduce_host(torch.tensor([0 if finite else 1], dtype=torch.int32), op=dist.ReduceOp.MAX)
        if not int(flags):
            return 0
        streak += 1
        step = self.state.step
        bad_terms = [k for k, v in terms.items() if not math.isfinite(v)] or ["gradient norm"]
        self.log.warning(f"step {step}: non-finite {bad_terms}; the update was skipped ({streak} in a row)")
        self.run_log.metrics(step, {"skipped/nonfinite": 1.0}, postfix=False)
        if streak > self.cfg.train.max_consecutive_nonfinite:
            raise NonFiniteError(
                f"{streak} consecutive non-finite steps, the last at step {step} "
                f"(non-finite: {', '.join(bad_terms)}); lower optim.lr or check the data"
            )
        return streak

    # ---- the loop ------------------------------------------------------------------------------------------
    def after_step(self, terms: dict[str, float]) -> None:
        """Called after every optimizer step of `fit` with the step's terms (a hook for subclasses, e.g. the
        throughput benchmark's clock)."""

    def fit(self, stop_at: int | None = None) -> int:
        """Train to schedule.max_steps (or only up to step `stop_at`, without the final save and hand-off);
        returns the exit code (0 done, 75 preempted after saving)."""
        cfg = self.cfg
        last = cfg.schedule.max_steps if stop_at is None else min(stop_at, cfg.schedule.max_steps)
        self.run_log = RunLogger(
            self.run_dir,
            rank=self.rank,
            total_steps=cfg.schedule.max_steps,
            initial_step=self.state.step,
            desc=cfg.stage.name,
            progress=cfg.train.progress,
        )
        self.engine.train()
        window, streak, exit_code = MetricsWindow(), 0, 0
        while self.state.step < last:
            terms = self.train_step()
            grad_norm = self.engine.get_global_grad_norm()
            streak = self.check_finite(terms, grad_norm, streak)
            window.add(terms, self.step_samples, self.step_tokens)
            self.run_log.advance()
            self.after_step(terms)
            self.checkpoints.poll()
            step = self.state.step
            if step % cfg.train.log_every == 0 or step == cfg.schedule.max_steps:
                self.log_window(window, grad_norm)
                window = MetricsWindow()
            if cfg.train.eval_every and step % cfg.train.eval_every == 0:
                self.evaluate()
            if preemption.stop_requested():
                self.log.warning(
                    f"received {preemption.received_signal() or 'a stop signal'}: saving at step {step} and exiting"
                )
                self.save()
                preemption.ignore_further_signals()
                exit_code = preemption.PREEMPTED_EXIT_CODE
                break
            if (
                cfg.checkpoint.save_every
                and step % cfg.checkpoint.save_every == 0
                and step < cfg.schedule.max_steps
            ):
                self.save()
        if exit_code == 0 and self.state.step >= cfg.schedule.max_steps:
            self.finish()
        self.checkpoints.wait()
        self.run_log.close()
        if dist.is_initialized():
            dist.barrier()
        return exit_code

    def log_window(self, window: MetricsWindow, grad_norm) -> None:
        elapsed = max(time.time() - window.start, 1e-9)
        metrics = _reduce_mean(window.means(), self.world_size)
        metrics["lr"] = self.scheduler.get_last_lr()[0]
        metrics["grad_norm"] = float(grad_norm) if grad_norm is not None else float("nan")
        metrics["perf/samples_per_s"] = window.samples / elapsed
        metrics["perf/tokens_per_s"] = window.tokens / elapsed
        if self.flops_per_step:
            from training.flops import mfu

            metrics["perf/tflops"] = self.flops_per_step * window.steps / elapsed / 1e12
            value = mfu(self.flops_per_step, elapsed / window.steps)
            if value is not None:
                metrics["perf/mfu"] = value
        metrics["progress/consumed_samples"] = self.state.consumed_samples
        self.run_log.metrics(self.state.step, metrics)

    def evaluate(self) -> dict[str, float]:
        from training.evaluate import evaluate_during_training

        metrics = evaluate_during_training(
            self.engine.module,
            self.cfg,
            self.state.step,
            self.run_log,
            self.rank,
            self.world_size,
            self.engine.device,
            self.input_dtype,
        )
        self.engine.train()
        return metrics

    def finish(self) -> None:
        """The final checkpoint (written in the background while the hand-off is gathered), the hand-off directory
        (RUN/final, the export layout) and, once the checkpoint is published, the DONE marker."""
        from training.engine import gather_full_state_dict
        from training.export import write_export

        self.save()
        state = self.state
        provenance = {
            "stage": self.cfg.stage.name,
            "kind": self.cfg.stage.kind,
            "step": state.step,
            "consumed_samples": state.consumed_samples,
        }
        weights = gather_full_state_dict(self.engine.module, self.rank)
        if self.rank == 0:
            disc_state = None
            if self.discriminator is not None:
                disc_state = {
                    k: v.detach().cpu() for k, v in self.discriminator.discriminator.state_dict().items()
                }
            write_export(
                weights, self.cfg, self.run_dir / "final", provenance, discriminator_state=disc_state
            )
        self.checkpoints.wait()
        if self.rank == 0:
            (self.run_dir / "DONE").write_text(json.dumps(provenance))


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
