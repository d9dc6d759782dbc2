"""The recipe runner's generic step kinds (train, python, command): validation, command lines, dependencies and
skip-on-rerun, on a recipe with no training step (fast); the demo recipe's steps are expressed with them."""

import json
import sys
import zipfile
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO_ROOT
from training.config import ConfigError
from training.fork_server import fork_server_wanted
from training.pipeline import STEP_KINDS, load_recipe, module_args, run_recipe, step_command


def _write(tmp_path: Path, recipe: dict) -> Path:
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


def test_module_args_become_flags():
    args = {"num_train": 10, "out": "d", "flag": True, "off": False, "unset": None, "sizes": [1, 2]}
    assert module_args(args) == ["--num-train", "10", "--out", "d", "--flag", "--sizes", "1", "2"]


def test_python_and_command_steps_run_in_dependency_order_and_skip_on_rerun(tmp_path):
    out = tmp_path / "out"
    write = "import pathlib, sys; pathlib.Path(sys.argv[1]).write_text('hi')"
    recipe = _write(
        tmp_path,
        {
            "output_dir": str(out),
            "parallel": 2,
            "steps": [
                {
                    "name": "hello",
                    "run": "command",
                    "command": [sys.executable, "-c", write, "{output_dir}/a.txt"],
                },
                {
                    "name": "pack",
                    "run": "python",
                    "module": "zipfile",
                    "args": {"create": ["{output_dir}/a.zip", "{output_dir}/a.txt"]},
                    "after": ["hello"],
                },
            ],
        },
    )
    assert run_recipe(recipe) == out
    with zipfile.ZipFile(out / "a.zip") as archive:
        assert [Path(n).name for n in archive.namelist()] == ["a.txt"]
    assert (out / "hello" / "DONE").is_file() and (out / "pack" / "DONE").is_file()
    (out / "a.txt").unlink()
    run_recipe(recipe)  # both steps are done: nothing runs again
    assert not (out / "a.txt").exists()


@pytest.mark.parametrize(
    ("step", "message"),
    [
        ({"name": "d", "run": "synthetic", "args": {"out": "x"}}, "run: one of"),
        ({"name": "d", "run": "python", "args": {"module": "m"}}, "needs module:"),
        ({"name": "d", "run": "command", "command": "echo hi"}, "needs command:"),
        ({"name": "d", "run": "command", "command": ["echo"], "config": {}}, "do not apply to run: command"),
        ({"name": "d", "run": "train", "module": "m"}, "do not apply to run: train"),
    ],
)
def test_bad_steps_are_named(tmp_path, step, message):
    with pytest.raises(ConfigError, match=message):
        load_recipe(_write(tmp_path, {"output_dir": str(tmp_path), "steps": [step]}))


def test_demo_steps_are_generic_steps():
    """The pipeline has no demo-specific step kind: the demo's data and report are python steps of its recipe."""
    assert STEP_KINDS == ("train", "python", "command")
    recipe = load_recipe(Path(REPO_ROOT) / "examples" / "demo" / "recipe.yaml")
    out = Path("/runs/x")
    steps = {s["name"]: s for s in recipe["steps"]}
    data = step_command(steps["data"], out / "data", out, recipe["defaults"], 1, [], "auto")
    assert data[1:4] == ["-m", "data_pipeline.synthetic", "--out"] and data[4] == "/runs/x/data"
    report = step_command(steps["report"], out / "report", out, recipe["defaults"], 1, [], "auto")
    assert report[1:] == ["-m", "examples.demo.report", "--run-dir", "/runs/x"]
    assert steps["report"]["after"] == sorted(set(steps) - {"report"})


def _report_recipe(tmp_path: Path, fork_server: bool, exit_code: int = 0) -> Path:
    """One python step that reports what its process sees, with 2 threads."""
    report = {
        "name": "report",
        "run": "python",
        "module": "tests.process_report",
        "args": {"out": "{output_dir}/seen.json", "exit_code": exit_code},
        "threads": 2,
    }
    out = tmp_path / f"fork_server_{fork_server}_{exit_code}"
    out.mkdir()
    return _write(out, {"output_dir": str(out), "parallel": 2, "fork_server": fork_server, "steps": [report]})


def test_forked_steps_behave_as_fresh_processes(tmp_path, monkeypatch):
    """A step forked from the warm server sees the argv, working directory, thread count and environment a fresh
    `python -m` would, its output goes to its log and its exit status is the step's. (That training in a forked
    rank is bitwise that of a fresh process: tests/test_stage_losses.py, whose ranks fork, against losses
    recorded in fresh processes.)"""
    monkeypatch.setenv("TEST_MARK", "x")
    monkeypatch.chdir(tmp_path)
    seen = {}
    for fork_server in (True, False):
        out = run_recipe(_report_recipe(tmp_path, fork_server))
        seen[fork_server] = json.loads((out / "seen.json").read_text())
        assert seen[fork_server].pop("argv") == ["--out", str(out / "seen.json"), "--exit-code", "0"]
        assert (out / "report" / "log.txt").read_text().strip() == "reported"
    assert seen[True] == seen[False] == {"threads": 2, "env": {"TEST_MARK": "x"}, "cwd": str(tmp_path)}, seen
    with pytest.raises(SystemExit, match=r"\[report\] failed with exit code 3"):
        run_recipe(_report_recipe(tmp_path, True, exit_code=3))


def test_fork_server_setting_is_checked(tmp_path):
    recipe = {"output_dir": str(tmp_path), "fork_server": "yes", "steps": []}
    with pytest.raises(ConfigError, match="fork_server must be true, false or auto, got 'yes'"):
        load_recipe(_write(tmp_path, recipe))


def test_fork_server_is_off_where_cuda_is_visible(monkeypatch):
    monkeypatch.setattr("torch.cuda.is_available", lambda: True)
    assert fork_server_wanted("auto") is False and fork_server_wanted(False) is False
    with pytest.raises(ConfigError, match="fork_server: true, but a CUDA device is visible"):
        fork_server_wanted(True)
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    assert fork_server_wanted("auto") is True and fork_server_wanted(False) is False
