"""Run a multi-stage recipe: `python -m training.pipeline --config RECIPE.yaml [--nproc N] [--only NAME ...]`.

A recipe is YAML (a complete one: examples/demo/recipe.yaml):

    output_dir: runs/demo
    nproc: 1                      # processes per training stage (local launch)
    defaults: {...}               # a stage config (training/run_config.py) merged under every stage
    steps:
      - {name: data, run: python, module: data_pipeline.synthetic, args: {out: "{output_dir}/data", seed: 0}}
      - {name: stage0_tokenizer, run: train, config: {stage: {kind: tokenizer}, ...}}
      - {name: stage1_align, run: train, config: {stage: {kind: align, init_from: "@stage0_tokenizer"}}}
      - {name: notify, run: command, command: [echo, "done: {output_dir}"], after: all}

Step kinds (`run:`):
  train    one training stage: `config:` (merged over `defaults:`) runs as `python -m training.train`.
  python   `python -m MODULE` with `module: MODULE`; each `args:` entry becomes `--key value` (underscores in the key
           become dashes; a list gives several values, true a bare flag, false or null nothing).
  command  `command: [PROGRAM, ARG, ...]`, run as given (no shell).

`"@NAME"` in a value is the hand-off directory of step NAME (OUTPUT/NAME/final); `{output_dir}` is substituted.
Each training step runs in its own process (one DeepSpeed engine per stage: ZeRO-3 fixes the trainable set when the
engine is built, see docs/design.md) with its resolved config written to OUTPUT/NAME/stage.yaml.
`fork_server: auto` (the default; or true, false) starts single-process `python -m` steps as forks of a server that
imported torch, DeepSpeed and transformers once (training/fork_server.py; 6-11 s saved per step on a 2-core CPU),
unless a CUDA device is visible. A step whose OUTPUT/NAME/DONE exists is skipped, so a re-run resumes the recipe
where it stopped (and an interrupted stage resumes from its own checkpoints with --resume auto).

`parallel: N` (default 1) runs up to N independent steps at once, each with OMP_NUM_THREADS = cores / (N x nproc)
and its output in OUTPUT/NAME/log.txt. A step waits for the steps it names with "@NAME" and in its `after:` list;
`after: all` waits for every step listed before it. With parallel 1 the steps run one after another in the
listed order. `threads: N` sets one step's OMP_NUM_THREADS (e.g. a long step that others wait for).
`templates:` is free-form: a place for YAML anchors (&name) that steps merge in (<<: *name).
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
from training.fork_server import ForkedStep, ForkServer, fork_server_wanted
from training.run_config import TrainConfig
from training.run_log import get_logger

STEP_KINDS = ("train", "python", "command")
RECIPE_KEYS = {
    "output_dir",
    "nproc",
    "parallel",
    "fork_server",
    "defaults",
    "templates",
    "steps",
    "description",
}
STEP_KEYS = {"name", "run", "config", "module", "args", "command", "after", "threads"}


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
    unknown = set(recipe) - RECIPE_KEYS
    if unknown:
        raise ConfigError(
            f"{path}: unknown recipe keys {sorted(unknown)}; expected {', '.join(sorted(RECIPE_KEYS))}"
        )
    names = set()
    for index, step in enumerate(recipe.get("steps", [])):
        if "name" not in step or step.get("run") not in STEP_KINDS:
            raise ConfigError(f"{path}: steps[{index}] needs a name and run: one of {STEP_KINDS}, got {step}")
        _check_step_fields(step, path)
        if step["name"] in names:
            raise ConfigError(f"{path}: duplicate step name {step['name']!r}")
        if step.get("after") == "all":
            step["after"] = sorted(names)
        unknown_deps = sorted(step_dependencies(step) - names)
        if unknown_deps:
            raise ConfigError(
                f"{path}: step {step['name']!r} depends on {unknown_deps}, which are not steps listed before it"
            )
        names.add(step["name"])
    if int(recipe.get("parallel", 1)) < 1:
        raise ConfigError(f"{path}: parallel must be >= 1, got {recipe['parallel']}")
    if recipe.get("fork_server", "auto") not in (True, False, "auto"):
        raise ConfigError(f"{path}: fork_server must be true, false or auto, got {recipe['fork_server']!r}")
    return recipe


def _check_step_fields(step: dict, path) -> None:
    """The fields each step kind needs: python a module, command a non-empty list of strings."""
    name, kind = step["name"], step["run"]
    if kind == "python" and not isinstance(step.get("module"), str):
        raise ConfigError(
            f"{path}: step {name!r}: run: python needs module: (a python module to run with -m)"
        )
    command = step.get("command")
    if kind == "command" and not (
        isinstance(command, list) and command and all(isinstance(c, str) for c in command)
    ):
        raise ConfigError(f"{path}: step {name!r}: run: command needs command: [PROGRAM, ARG, ...] (strings)")
    misplaced = {
        "train": ("module", "args", "command"),
        "python": ("config", "command"),
        "command": ("config", "module", "args"),
    }
    extra = sorted(key for key in misplaced[kind] if key in step)
    if extra:
        raise ConfigError(f"{path}: step {name!r}: {extra} do not apply to run: {kind}")


def module_args(args: dict) -> list[str]:
    """`args:` of a python step as command-line flags: {num_train: 10} -> ["--num-train", "10"]; a list gives
    several values, true a bare flag, false or null nothing."""
    flags: list[str] = []
    for key, value in args.items():
        if value is None or value is False:
            continue
        flags.append(f"--{key.replace('_', '-')}")
        if value is True:
            continue
        if isinstance(value, list):
            flags.extend(str(item) for item in value)
        else:
            flags.append(str(value))
    return flags


def step_dependencies(step: dict) -> set[str]:
    """Names of the steps that `step` waits for: its "@NAME" references and its `after:` list."""
    found: set[str] = set(step.get("after", []))

    def visit(value) -> None:
        if isinstance(value, dict):
            for item in value.values():
                visit(item)
        elif isinstance(value, list):
            for item in value:
                visit(item)
        elif isinstance(value, str) and value.startswith("@"):
            found.add(value[1:])

    visit(step.get("config", {}))
    visit(step.get("args", {}))
    visit(step.get("command", []))
    return found


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


def recipe_output_dir(recipe: dict, recipe_path: str | Path) -> Path:
    """The recipe's output directory: `output_dir:`, default runs/RECIPE_STEM."""
    return Path(recipe.get("output_dir", "runs/" + Path(recipe_path).stem))


def train_step_config(step: dict, step_dir: Path, output_dir: Path, defaults: dict) -> dict:
    """The stage config (a dict) a `train` step runs with: its `config:` merged over `defaults:`, its name and
    output directory set, "@NAME" and "{output_dir}" resolved (also used by training.plan)."""
    stage = deep_merge(defaults, step.get("config", {}))
    stage = deep_merge(stage, {"stage": {"name": step["name"]}, "train": {"output_dir": str(step_dir)}})
    return resolve_refs(stage, output_dir)


def step_command(step: dict, step_dir: Path, output_dir: Path, defaults: dict, nproc: int, overrides, resume):
    """The command line of one step; a training step's resolved config is written to STEP_DIR/stage.yaml."""
    if step["run"] == "train":
        stage = train_step_config(step, step_dir, output_dir, defaults)
        config_path = step_dir / "stage.yaml"
        config_path.write_text(yaml.safe_dump(stage, sort_keys=False))
        load_config(TrainConfig, config_path, list(overrides))
        return stage_command(config_path, nproc, resume) + list(overrides)
    if step["run"] == "command":
        return resolve_refs(list(step["command"]), output_dir)
    return [sys.executable, "-m", step["module"]] + module_args(
        resolve_refs(step.get("args", {}), output_dir)
    )


def run_recipe(
    recipe_path: str | Path,
    only: list[str] | None = None,
    nproc: int | None = None,
    overrides=(),
    resume: str = "auto",
) -> Path:
    """Run the recipe's steps (up to `parallel` at once, in dependency order); returns the output directory."""
    log = get_logger()
    recipe = load_recipe(recipe_path)
    output_dir = recipe_output_dir(recipe, recipe_path)
    nproc = nproc or int(recipe.get("nproc", 1))
    parallel = int(recipe.get("parallel", 1))
    defaults = recipe.get("defaults", {})
    env = dict(os.environ)
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[1]) + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 2) // (nproc * parallel))))
    steps = [s for s in recipe.get("steps", []) if not only or s["name"] in only]
    for step in steps:
        unknown = set(step) - STEP_KEYS
        if unknown:
            raise ConfigError(
                f"step {step['name']!r}: unknown keys {sorted(unknown)}; expected {sorted(STEP_KEYS)}"
            )
        if step["run"] == "train":
            _check_stage_config(
                deep_merge(defaults, step.get("config", {})), output_dir, overrides, step["name"]
            )
    fork_server = ForkServer(env) if fork_server_wanted(recipe.get("fork_server", "auto")) else None
    selected = {s["name"] for s in steps}
    done: set[str] = set()
    running: dict[str, tuple[subprocess.Popen | ForkedStep, dict, float]] = {}
    started = time.time()
    while len(done) < len(steps):
        progressed = False
        for step in steps:
            name = step["name"]
            if name in done or name in running or len(running) >= parallel:
                continue
            waits_for = step_dependencies(step) & selected
            if parallel == 1:
                waits_for |= {s["name"] for s in steps[: steps.index(step)]}
            if not waits_for <= done:
                continue
            step_dir = output_dir / name
            if resume == "auto" and (step_dir / "DONE").exists():
                log.info(f"[{name}] already complete, skipping")
                done.add(name)
                progressed = True
                continue
            step_dir.mkdir(parents=True, exist_ok=True)
            command = step_command(step, step_dir, output_dir, defaults, nproc, overrides, resume)
            log.info(f"[{name}] {step['run']} started ({time.time() - started:.0f} s into the recipe)")
            log_path = step_dir / "log.txt" if parallel > 1 else None
            step_env = {**env, "OMP_NUM_THREADS": str(step["threads"])} if "threads" in step else env
            if fork_server is not None and step["run"] != "command" and fork_server.can_run(command):
                process = fork_server.start(command, step_env, log_path and str(log_path))
            else:
                output = open(log_path, "w") if log_path else None
                process = subprocess.Popen(
                    command, env=step_env, stdout=output, stderr=subprocess.STDOUT if output else None
                )
            running[name] = (process, step, time.time())
        if not running and progressed:
            continue
        if not running:
            raise ConfigError(
                f"steps {sorted(selected - done)} wait for steps that are not selected or failed"
            )
        finished = _wait_any(running)
        process, step, step_start = running.pop(finished)
        step_dir = output_dir / finished
        if process.returncode != 0:
            for other, _, _ in running.values():
                other.terminate()
            for other, _, _ in running.values():
                other.wait()
            hint = f"; its output is in {step_dir / 'log.txt'}" if parallel > 1 else ""
            raise SystemExit(f"[{finished}] failed with exit code {process.returncode}{hint}")
        if step["run"] != "train":
            (step_dir / "DONE").write_text("ok\n")
            if parallel > 1:
                _echo_last_line(step_dir / "log.txt", finished)
        done.add(finished)
        log.info(f"[{finished}] done in {time.time() - step_start:.0f} s ({len(done)}/{len(steps)} steps)")
    log.info(f"recipe finished in {time.time() - started:.0f} s; outputs in {output_dir}")
    return output_dir


def _check_stage_config(stage: dict, output_dir: Path, overrides, name: str) -> None:
    """Validate a training step's config before anything runs, except the paths that earlier steps create."""
    import tempfile

    with tempfile.NamedTemporaryFile("w", suffix=".yaml") as handle:
        handle.write(yaml.safe_dump(resolve_refs(stage, output_dir)))
        handle.flush()
        try:
            load_config(TrainConfig, handle.name, list(overrides))
        except ConfigError as exc:
            if "does not exist" not in str(exc):
                raise ConfigError(f"step {name!r}: {exc}") from None


def _echo_last_line(log_path: Path, name: str) -> None:
    """Print the last line of a finished step's captured output (e.g. where the report was written)."""
    lines = [line for line in log_path.read_text(errors="replace").splitlines() if line.strip()]
    if lines:
        print(f"[{name}] {lines[-1]}", flush=True)


def _wait_any(running: dict) -> str:
    """Block until one of the running steps exits; returns its name."""
    while True:
        for name, (process, _, _) in running.items():
            if process.poll() is not None:
                return name
        time.sleep(0.1)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training.pipeline", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True, help="recipe YAML (e.g. examples/demo/recipe.yaml)")
    parser.add_argument("--only", nargs="*", default=None, help="run only these steps")
    parser.add_argument(
        "--nproc", type=int, default=None, help="processes per training stage (default: recipe nproc)"
    )
    parser.add_argument(
        "--resume",
        default="auto",
        choices=("auto", "none"),
        help="auto: skip finished steps and resume interrupted stages (default); none: run every step afresh",
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
