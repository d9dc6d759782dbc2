"""Train one stage: `python -m training.train --config STAGE.yaml [section.key=value ...] [--resume auto|PATH|none]`.

Works as plain python (one process), under torchrun, and under the deepspeed launcher (which adds --local_rank).
The stage kind (stage.kind) decides the objective and the trainable set (training/stages.py); the loop is
training/trainer.py.
Exit codes: 0 done, 75 preempted (saved; requeue and resume with --resume auto), 2 bad configuration or a
checkpoint that cannot be resumed (incomplete, damaged, another model's): the config is loaded and checked (training/run_config.py `check_stage`: datasets, hand-offs, the text tokenizer, the
DeepSpeed config, the batch over WORLD_SIZE, the same checks as `python -m training.plan`) before anything is built.
"""

from __future__ import annotations

import argparse
import os
import sys

from training import checkpoint as ckpt
from training.config import ConfigError, load_config
from training.run_config import TrainConfig, check_stage
from training.trainer import NonFiniteError, Trainer

EPILOG = """examples:
  python -m training.train --config STAGE.yaml optim.lr=1e-4 schedule.max_steps=200
  torchrun --nproc_per_node 2 -m training.train --config STAGE.yaml --resume auto
  deepspeed --num_gpus 8 -m training.train --config STAGE.yaml

exit codes: 0 finished, 75 preempted after saving (requeue with --resume auto), 2 configuration error or
            a checkpoint that cannot be resumed (--resume PATH incomplete or damaged), 3 too many consecutive
            non-finite steps."""


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
    parser.add_argument("--config", required=True, help="stage YAML file (e.g. examples/stage2_ett.yaml)")
    parser.add_argument(
        "--resume",
        default=None,
        help="auto: newest complete checkpoint of this stage whose files pass their recorded size and crc32 "
        "(damaged ones are skipped with a warning; default: checkpoint.resume in the config); PATH: a checkpoint "
        "directory, which must pass the same check; none: start fresh",
    )
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument(
        "overrides", nargs="*", help="config overrides, e.g. optim.lr=1e-4 train.micro_batch_size=2"
    )
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        cfg = load_config(TrainConfig, args.config, args.overrides)
        # The checks of `python -m training.plan`, before any process group, model or engine exists.
        check_stage(cfg, world_size=int(os.environ.get("WORLD_SIZE", "1")))
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


def run_stage(cfg: TrainConfig, resume: str) -> int:
    """Train one stage to its end (or to a preemption); returns the exit code."""
    trainer = Trainer(cfg)
    trainer.setup(resume)
    return trainer.fit()


if __name__ == "__main__":
    sys.exit(main())
