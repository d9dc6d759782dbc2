"""Pipeline steps as forks of a warm server: one import of torch, DeepSpeed and transformers per recipe, not per step.

A fresh `python -m training.train` on a 2-core CPU spends 6-12 s importing, before its first step and during its
export: torch (~2.7 s), torch._dynamo (~2.8 s, pulled in by the first optimizer's constructor), DeepSpeed
(~0.6 s), transformers (the exported config classes) and what they pull in. A 3-step stage takes 15.5 s as a fresh
process and 4 s as a fork; the demo recipe runs 31 steps. Here multiprocessing's forkserver imports WARM_IMPORTS once,
in a single-threaded server process that never runs a tensor operation (so there is no OpenMP pool to inherit),
and each step is a fork of it that behaves as `python -m MODULE ARGS` would: runpy runs the module as __main__ with
the step's environment, thread count, working directory and log file, and its exit status is the step's return
code. Each step still gets its own process, hence its own DeepSpeed engine and its own memory, which the OS
reclaims at exit.

Two differences from a fresh interpreter remain. Environment variables that a library reads when it is imported
are read once, by the server, which starts with the steps' common environment (the pipeline's; a step's own
`threads:` is applied in the child with torch.set_num_threads). And as with any forkserver, each child imports the
launching program's main module again (as __mp_main__), so a script that calls run_recipe needs the usual
`if __name__ == "__main__":` guard.

Where CUDA is visible the steps start as fresh interpreters instead (`fork_server: auto`): the server's imports may
initialise the CUDA driver (DeepSpeed probes the accelerator at import), and a forked child cannot use a driver
its parent initialised. There, a few seconds of imports are small against a GPU stage anyway.
"""

from __future__ import annotations

import multiprocessing
import os
import runpy
import signal
import subprocess
import sys

from training.config import ConfigError

WARM_IMPORTS = [
    "torch",
    "torch._dynamo",
    "deepspeed",
    "transformers",
    "transformers.models.llama",
    "transformers.models.qwen2",
    "training.train",
    "training.trainer",
    "training.export",
]


def _run_module(module: str, args: list[str], env: dict, cwd: str, log_path: str | None) -> None:
    """The forked child: become `python -m MODULE ARGS` (exits with its status)."""
    os.environ.clear()
    os.environ.update(env)
    os.chdir(cwd)
    if log_path is not None:
        log = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(log, 1)
        os.dup2(log, 2)
        os.close(log)
    if "OMP_NUM_THREADS" in env:
        import torch

        torch.set_num_threads(int(env["OMP_NUM_THREADS"]))
    sys.argv = [module, *args]
    runpy.run_module(module, run_name="__main__", alter_sys=True)


class ForkedStep:
    """A step running as a fork of the server, with subprocess.Popen's interface for waiting and signalling."""

    def __init__(self, process: multiprocessing.process.BaseProcess):
        self.process = process
        self.pid = process.pid

    @property
    def returncode(self) -> int | None:
        """The exit status; -N if signal N ended the step (as Popen's)."""
        return self.process.exitcode

    def poll(self) -> int | None:
        return self.process.exitcode

    def wait(self, timeout: float | None = None) -> int:
        self.process.join(timeout)
        if self.process.exitcode is None:
            raise subprocess.TimeoutExpired(self.process.name, timeout)
        return self.process.exitcode

    def send_signal(self, sig: int) -> None:
        if self.process.exitcode is None:
            os.kill(self.pid, sig)

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)


class ForkServer:
    """Starts `[sys.executable, "-m", MODULE, ARGS...]` commands as forks of one warm server process (started at the
    first step)."""

    def __init__(self, env: dict | None = None):
        """env: the environment the server starts and imports with (default: ours), e.g. the steps' common one, so
        that what libraries read at import (thread pools sized by OMP_NUM_THREADS) is what a fresh step reads."""
        self.env = env
        self.server_started = False
        self.context = multiprocessing.get_context("forkserver")
        self.context.set_forkserver_preload(WARM_IMPORTS)

    def _ensure_server(self) -> None:
        """Start the server once, in self.env (Process.start would start it in ours)."""
        if self.server_started or self.env is None:
            return
        from multiprocessing import forkserver

        saved = dict(os.environ)
        try:
            os.environ.clear()
            os.environ.update(self.env)
            forkserver.ensure_running()
        finally:
            os.environ.clear()
            os.environ.update(saved)
        self.server_started = True

    @staticmethod
    def can_run(command: list[str]) -> bool:
        """A `python -m MODULE` command of this interpreter (torch.distributed.run launches its own ranks)."""
        return (
            len(command) >= 3
            and command[0] == sys.executable
            and command[1] == "-m"
            and command[2] != "torch.distributed.run"
        )

    def start(
        self, command: list[str], env: dict, log_path: str | None, cwd: str | None = None
    ) -> ForkedStep:
        """Run COMMAND with exactly ENV in CWD (default: ours), stdout and stderr to LOG_PATH (None: ours)."""
        self._ensure_server()
        process = self.context.Process(
            target=_run_module,
            args=(command[2], list(command[3:]), dict(env), cwd or os.getcwd(), log_path),
            name=command[2],
        )
        process.start()
        return ForkedStep(process)


def fork_server_wanted(setting: bool | str) -> bool:
    """`fork_server:` of a recipe: auto (on unless a CUDA device is visible), true or false."""
    if setting is False:
        return False
    import torch

    if not torch.cuda.is_available():
        return True
    if setting is True:
        raise ConfigError(
            "fork_server: true, but a CUDA device is visible: a step forked from the server could not use CUDA "
            "(the server's imports initialise the driver); use fork_server: auto or false"
        )
    return False
