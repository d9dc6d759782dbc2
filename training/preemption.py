"""Preemption: SIGTERM / SIGUSR1 (SLURM sends one ahead of the time limit with --signal) request a clean stop.

The loop finishes the current step, saves (waiting until that checkpoint is published), and exits with
PREEMPTED_EXIT_CODE, which the launch scripts turn into `scontrol requeue`. Every rank must stop at the same step,
so `stop_requested()` reduces the flag over all ranks.
"""

from __future__ import annotations

import signal

import torch
import torch.distributed as dist

PREEMPTED_EXIT_CODE = 75

_requested = {"signal": None}


def _handler(signum, _frame) -> None:
    _requested["signal"] = signum


def install_handlers() -> None:
    for sig in (signal.SIGTERM, signal.SIGUSR1):
        signal.signal(sig, _handler)


def ignore_further_signals() -> None:
    """Once the stop is under way (saved, exiting), later SIGTERM/SIGUSR1 (SLURM may repeat them, launchers forward
    them) must not kill the process with the default action during shutdown."""
    for sig in (signal.SIGTERM, signal.SIGUSR1):
        signal.signal(sig, signal.SIG_IGN)


def stop_requested() -> bool:
    """True on every rank as soon as any rank received a stop signal."""
    from training.engine import all_reduce_host

    flag = torch.tensor([1 if _requested["signal"] is not None else 0], dtype=torch.int32)
    return bool(all_reduce_host(flag, op=dist.ReduceOp.MAX).item())


def received_signal() -> str | None:
    sig = _requested["signal"]
    return signal.Signals(sig).name if sig is not None else None
