"""Shared pytest fixtures and marker handling.

`gpu` tests are skipped without CUDA; `slurm` tests are skipped unless a SLURM controller answers
(`.ci/run` starts a local two-node cluster with launch/ci/local_slurm.sh).
"""

import os
import random
import shutil
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch

from training.engine import free_port
from training.fork_server import ForkServer

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _slurm_available() -> bool:
    if shutil.which("sinfo") is None:
        return False
    try:
        out = subprocess.run(["sinfo", "-h", "-N", "-o", "%N %t"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return out.returncode == 0 and "idle" in out.stdout


def pytest_collection_modifyitems(config, items):
    has_cuda = torch.cuda.is_available()
    has_slurm = None
    for item in items:
        if "gpu" in item.keywords and not has_cuda:
            item.add_marker(pytest.mark.skip(reason="needs a CUDA GPU"))
        if "slurm" in item.keywords:
            if has_slurm is None:
                has_slurm = _slurm_available()
            if not has_slurm:
                item.add_marker(
                    pytest.mark.skip(reason="needs the local SLURM cluster (launch/ci/local_slurm.sh start)")
                )


@pytest.fixture
def seed_everything():
    """Seed python, numpy and torch; returns the seeding function for re-use inside a test."""

    def _seed(seed: int = 0) -> None:
        random.seed(seed)
        np.random.seed(seed)
        torch.manual_seed(seed)

    _seed(0)
    return _seed


@pytest.fixture
def repo_root() -> str:
    return REPO_ROOT


@pytest.fixture
def subprocess_env() -> dict:
    """Environment for child python processes: repo on PYTHONPATH, one thread per process."""
    return child_env()


class RankGroup:
    """N `python -m training.train` processes started with RANK/WORLD_SIZE/MASTER_* env, as torchrun would.
    Unlike torchrun, every worker is started by us (forked from FORK_SERVER, or a fresh interpreter), so a test can
    kill -9 all of them."""

    def __init__(self, procs, logs):
        self.procs = procs
        self.logs = logs

    def wait(self, timeout: float = 600) -> list[int]:
        return [p.wait(timeout=timeout) for p in self.procs]

    def kill9(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGKILL)
        for proc in self.procs:
            proc.wait()

    def signal(self, sig) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(sig)

    def output(self) -> str:
        return "\n".join(f"--- rank {i} ---\n{open(path).read()[-6000:]}" for i, path in enumerate(self.logs))


def child_env(extra: dict | None = None) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = REPO_ROOT + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("OMP_NUM_THREADS", "1")
    env.update(extra or {})
    return env


# Rank processes fork from one warm server per test session (the pipeline's launcher), instead of each importing
# torch, DeepSpeed and transformers anew (6-12 s of CPU per process).
FORK_SERVER = ForkServer(child_env())


def start_ranks(
    nproc: int,
    args: list[str],
    log_dir,
    env_extra: dict | None = None,
    module: str = "training.train",
    fresh_interpreter: bool = False,
) -> RankGroup:
    """Start `python -m MODULE args` (training.train by default) on nproc ranks (gloo on CPU); logs go to
    log_dir/rankR-PORT.log. fresh_interpreter: start each rank with subprocess (e.g. for a sitecustomize hook on
    PYTHONPATH) instead of forking it from FORK_SERVER."""
    port = free_port()
    procs, logs = [], []
    for rank in range(nproc):
        env = child_env(env_extra)
        env.update(
            RANK=str(rank),
            LOCAL_RANK=str(rank),
            WORLD_SIZE=str(nproc),
            LOCAL_WORLD_SIZE=str(nproc),
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(port),
        )
        log_path = os.path.join(str(log_dir), f"rank{rank}-{port}.log")
        logs.append(log_path)
        command = [sys.executable, "-m", module, *args]
        if fresh_interpreter:
            proc = subprocess.Popen(
                command, cwd=REPO_ROOT, env=env, stdout=open(log_path, "w"), stderr=subprocess.STDOUT
            )
        else:
            proc = FORK_SERVER.start(command, env, log_path, cwd=REPO_ROOT)
        procs.append(proc)
    return RankGroup(procs, logs)


def run_ranks(
    nproc: int,
    args: list[str],
    log_dir,
    env_extra: dict | None = None,
    timeout: float = 600,
    module: str = "training.train",
) -> RankGroup:
    """start_ranks, wait, and fail the test with every rank's log tail if any rank exits non-zero."""
    group = start_ranks(nproc, args, log_dir, env_extra, module)
    try:
        codes = group.wait(timeout)
    finally:
        group.kill9()
    if any(codes):
        pytest.fail(f"{module} exited with {codes}\n{group.output()}")
    return group


@pytest.fixture
def launch_ranks(tmp_path):
    """launch_ranks(nproc, args) -> RankGroup running `python -m training.train args` on nproc ranks."""
    groups = []

    def _launch(nproc: int, args: list[str], env_extra: dict | None = None) -> RankGroup:
        group = start_ranks(nproc, args, tmp_path, env_extra)
        groups.append(group)
        return group

    yield _launch
    for group in groups:
        group.kill9()


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory):
    """The synthetic dataset at a tiny size (every split + the sentencepiece tokenizer), made once per session."""
    from data_pipeline.synthetic import write_synthetic

    out = tmp_path_factory.mktemp("synthetic")
    write_synthetic(out, seed=0, num_train=240, num_eval=40)
    return out


ETT_RUN_STEPS = 1


@pytest.fixture(scope="session")
def ett_zero3_run(tiny_data, tmp_path_factory):
    """ROOT of a 2-rank ZeRO-3 ETT stage of ETT_RUN_STEPS steps (tied Llama-type LLM, trained tokenizer, visual
    head) started from a random hand-off at ROOT/init: ROOT/run holds its checkpoints, final/ hand-off and DONE.
    Shared by the export tests; they only read it."""
    from tests.tiny_configs import stage_config, write_stage_config
    from training.export import run_config_from_dict, write_export
    from training.stages import build_model

    root = tmp_path_factory.mktemp("ett_zero3_run")
    sections = {
        "stage": {"init_from": str(root / "init")},
        "model": {"llm": {"qkv_bias": False, "tie_embeddings": True}, "ett": {"visual_head": True}},
        "schedule": {"max_steps": ETT_RUN_STEPS},
        "train": {"global_batch_size": 4, "micro_batch_size": 2},
    }
    init_cfg = run_config_from_dict(stage_config("ett", tiny_data, root / "run", **sections))
    torch.manual_seed(0)
    model = build_model(init_cfg)
    state = {k: v for k, v in model.state_dict().items() if not k.startswith("vq_loss.")}
    write_export(state, init_cfg, root / "init", {"stage": "init", "step": 0})
    config = write_stage_config(root / "ett.yaml", "ett", tiny_data, root / "run", **sections)
    run_ranks(2, ["--config", str(config), "--resume", "none"], root)
    return root
