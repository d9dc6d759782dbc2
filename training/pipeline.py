"""Run a multi-stage recipe: `python -m training.pipeline --config RECIPE.yaml [--nproc N] [--only NAME ...]`.

A recipe is YAML:

    output_dir: runs/demo
    nproc: 1                      # processes per training stage (local launch)
    defaults: {...}               # a stage config (training/run_config.py) merged under every stage
    steps:
      - {name: data, run: synthetic, args: {out: "{output_dir}/data", seed: 0}}
      - {name: stage0_tokenizer, run: train, config: {stage: {kind: tokenizer}, ...}}
      - {name: stage1_align, run: train, config: {stage: {kind: align, init_from: "@stage0_tokenizer"}}}

`"@NAME"` in a value is the hand-off directory of step NAME (OUTPUT/NAME/final); `{output_dir}` is substituted.
Each training step runs in a fresh process (one DeepSpeed engine per stage, DESIGN.md decision 2) with its resolved
config written to OUTPUT/NAME/stage.yaml; a step whose OUTPUT/NAME/DONE exists is skipped, so a re-run resumes
the recipe where it stopped (and an interrupted stage resumes from its own checkpoints with --resume auto).
"""

from __future__ import annotations

import argparse
import copy
import os
import subprocess
import sys
import time
from pathlib import Path

import yaml

from training.config import ConfigError, load_config
from training.run_config import TrainConfig
from training.run_log import get_logger

STEP_KINDS = ("train", "synthetic", "text_tokenizer", "python")


def deep_merge(base: dict, update: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def resolve_refs(value, output_dir: Path):
    """Replace "@STEP" by that step's hand-off directory and "{output_dir}" by the recipe's output directory."""
    if isinstance(value, dict):
        return {k: resolve_refs(v, output_dir) for k, v in value.items()}
    if isinstance(value, list):
        return [resolve_refs(v, output_dir) for v in value]
    if isinstance(value, str):
        if value.startswith("@"):
            return str(output_dir / value[1:] / "final")
        return value.replace("{output_dir}", str(output_dir))
    return value


def load_recipe(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"recipe not found: {path}")
    recipe = yaml.safe_load(path.read_text()) or {}
    unknown = set(recipe) - {"output_dir", "nproc", "defaults", "steps", "description"}
    if unknown:
        raise ConfigError(
            f"{path}: unknown recipe keys {sorted(unknown)}; expected output_dir, nproc, defaults, steps"
        )
    names = set()
    for index, step in enumerate(recipe.get("steps", [])):
        if "name" not in step or step.get("run") not in STEP_KINDS:
            raise ConfigError(f"{path}: steps[{index}] needs a name and run: one of {STEP_KINDS}, got {step}")
        if step["name"] in names:
            raise ConfigError(f"{path}: duplicate step name {step['name']!r}")
        names.add(step["name"])
    return recipe


def stage_command(config_path: Path, nproc: int, resume: str = "auto") -> list[str]:
    if nproc <= 1:
        return [sys.executable, "-m", "training.train", "--config", str(config_path), "--resume", resume]
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        str(nproc),
        "-m",
        "training.train",
        "--config",
        str(config_path),
        "--resume",
        "auto",
    ]


def run_recipe(
    recipe_path: str | Path,
    only: list[str] | None = None,
    nproc: int | None = None,
    overrides=(),
    resume: str = "auto",
) -> Path:
    log = get_logger()
    recipe = load_recipe(recipe_path)
    output_dir = Path(recipe.get("output_dir", "runs/" + Path(recipe_path).stem))
    nproc = nproc or int(recipe.get("nproc", 1))
    defaults = recipe.get("defaults", {})
    env = dict(os.environ)
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[1]) + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 2) // nproc)))
    started = time.time()
    for step in recipe.get("steps", []):
        name = step["name"]
        if only and name not in only:
            continue
        step_dir = output_dir / name
        if resume == "auto" and (step_dir / "DONE").exists():
            log.info(f"[{name}] already complete, skipping")
            continue
        step_dir.mkdir(parents=True, exist_ok=True)
        log.info(f"[{name}] {step['run']} ({time.time() - started:.0f} s into the recipe)")
        if step["run"] == "train":
            stage = deep_merge(defaults, step.get("config", {}))
            stage = deep_merge(stage, {"stage": {"name": name}, "train": {"output_dir": str(step_dir)}})
            stage = resolve_refs(stage, output_dir)
            config_path = step_dir / "stage.yaml"
            config_path.write_text(yaml.safe_dump(stage, sort_keys=False))
            load_config(TrainConfig, config_path, list(overrides))
            command = stage_command(config_path, nproc, resume) + list(overrides)
        else:
            args = resolve_refs(step.get("args", {}), output_dir)
            module = {
                "synthetic": "data_pipeline.synthetic",
                "text_tokenizer": "data_pipeline.text_tokenizer",
            }.get(step["run"], args.pop("module", None))
            command = [sys.executable, "-m", module] + [
                item for key, value in args.items() for item in (f"--{key.replace('_', '-')}", str(value))
            ]
        result = subprocess.run(command, env=env)
        if result.returncode != 0:
            raise SystemExit(f"[{name}] failed with exit code {result.returncode}: {' '.join(command)}")
        if step["run"] != "train":
            (step_dir / "DONE").write_text("ok\n")
    log.info(f"recipe finished in {time.time() - started:.0f} s; outputs in {output_dir}")
    return output_dir


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training.pipeline", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True, help="recipe YAML (see training/recipes/)")
    parser.add_argument("--only", nargs="*", default=None, help="run only these steps")
    parser.add_argument(
        "--nproc", type=int, default=None, help="processes per training stage (default: recipe nproc)"
    )
    parser.add_argument("overrides", nargs="*", help="overrides applied to every training stage")
    args = parser.parse_args(argv)
    try:
        run_recipe(args.config, args.only, args.nproc, args.overrides, args.resume)
    except ConfigError as exc:
        print(f"configuration error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
