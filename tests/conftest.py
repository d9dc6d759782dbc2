"""Shared pytest fixtures and marker handling.

`gpu` tests are skipped without CUDA; `slurm` tests are skipped unless a SLURM controller answers
(`.ci/run` starts a local two-node cluster with launch/ci/local_slurm.sh).
"""

import os
import random
import shutil
import subprocess

import numpy as np
import pytest
import torch

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
                item.add_marker(pytest.mark.skip(reason="needs the local SLURM cluster (launch/ci/local_slurm.sh start)"))


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
    """Environment for child python processes: repo on PYTHONPATH, one thread per process, quiet DeepSpeed."""
    env = dict(os.environ)
    env["PYTHONPATH"] = REPO_ROOT + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("OMP_NUM_THREADS", "1")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    return env
