"""Per-step losses of a tiny run of every stage kind, under ZeRO-3 on 1 and 2 processes.

The stored values (tests/data/stage_losses.json) were recorded before a refactor of the trainer; the test
tests/test_stage_losses.py re-runs the same chain and requires every per-step loss term to be bitwise equal, so a
refactor that claims to keep behaviour has to show it. Re-record only for a change that is meant to alter the
numbers, and say so in its commit:

    python -m tests.stage_losses --out tests/data/stage_losses.json
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from tests.conftest import run_ranks
from tests.tiny_configs import write_stage_config

STEPS = 3
WORLD_SIZES = (1, 2)


def chain(runs: dict[str, Path]) -> list[tuple[str, str, dict]]:
    """(run name, stage kind, config sections): every kind, each starting from the hand-offs before it."""
    ett_from = {"stage": {"init_from": str(runs["ett"] / "final")}}
    return [
        ("tokenizer", "tokenizer", {"optim": {"lr": 2e-3}}),
        ("llm", "llm_pretrain", {}),
        (
            "align",
            "align",
            {
                "stage": {
                    "init_tokenizer_from": str(runs["tokenizer"] / "final"),
                    "init_llm_from": str(runs["llm"] / "final"),
                }
            },
        ),
        ("ett", "ett", {"stage": {"init_from": str(runs["align"] / "final")}, "optim": {"lr": 1e-3}}),
        (
            "ett_index",
            "ett",
            {
                "stage": {"init_from": str(runs["align"] / "final"), "train_tokenizer": False},
                "model": {"ett": {"visual_input": "index"}},
            },
        ),
        ("chat_sft", "chat_sft", ett_from),
        ("t2i", "t2i", {**ett_from, "model": {"ett": {"visual_head": True}}}),
    ]


def loss_terms(run_dir: Path) -> list[dict[str, float]]:
    """Every loss term (`loss/*`, the L_vq terms `vq/*`, the discriminator's `disc/*`) of every logged step, from
    the run's metrics.jsonl."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [
        {k: v for k, v in row.items() if k.startswith(("loss/", "vq/", "disc/"))} | {"step": row["step"]}
        for row in rows
        if "loss/total" in row
    ]


def run_chain(data_dir: Path, work_dir: Path, nproc: int) -> dict[str, list[dict[str, float]]]:
    """The whole chain on `nproc` ranks, every stage in the same processes one after the other (`run_stages`)."""
    runs = {
        name: work_dir / f"np{nproc}" / name
        for name in ("tokenizer", "llm", "align", "ett", "ett_index", "chat_sft", "t2i")
    }
    configs = [
        write_stage_config(
            work_dir / f"np{nproc}-{name}.yaml",
            kind,
            data_dir,
            runs[name],
            schedule={"max_steps": STEPS, "warmup_ratio": 0.0, "kind": "constant"},
            **sections,
        )
        for name, kind, sections in chain(runs)
    ]
    run_ranks(nproc, ["--run-stages", *map(str, configs)], work_dir, module="tests.stage_losses")
    return {name: loss_terms(runs[name]) for name in runs}


def run_stages(configs: list[str]) -> int:
    """One rank's part of a chain: `python -m training.train --config C --resume none` for each config in turn,
    in this process (one start-up for the whole chain)."""
    from training.train import main as train

    for config in configs:
        code = train(["--config", config, "--resume", "none"])
        if code:
            return code
    return 0


def record(work_dir: Path) -> dict:
    from data_pipeline.synthetic import write_synthetic

    data_dir = work_dir / "data"
    write_synthetic(data_dir, seed=0, num_train=240, num_eval=40)
    return {f"np{n}": run_chain(data_dir, work_dir, n) for n in WORLD_SIZES}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", help="JSON file to write the per-step losses to")
    parser.add_argument("--run-stages", nargs="+", metavar="CONFIG", help="(one rank of run_chain)")
    args = parser.parse_args()
    if args.run_stages:
        sys.exit(run_stages(args.run_stages))
    if not args.out:
        parser.error("--out is required")
    with tempfile.TemporaryDirectory() as tmp:
        values = record(Path(tmp))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(values, indent=1, sort_keys=True) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
