"""Smoke-check a cluster before a long job: create the process group, all-reduce, print rank / world / host.

    bash launch/local.sh 2 -m launch.check_dist                                  # one node, 2 processes
    ETT_MODULE=launch.check_dist sbatch -N2 launch/slurm/train.sbatch            # through the deepspeed launcher
    srun -N2 --ntasks-per-node=4 python -m launch.check_dist --launcher slurm    # one srun task per process

Each rank contributes rank + 1 to an all-reduce (sum) and checks the result against world * (world + 1) / 2, then
all-gathers host names, so a wrong MASTER_ADDR, a blocked port or a rank mix-up fails here in seconds. Backend:
nccl when CUDA is available, else gloo. Exit code 0 when every check passes, 1 otherwise, 2 on a launch error.
"""

from __future__ import annotations

import argparse
import datetime
import os
import socket
import sys

import torch
import torch.distributed as dist

from launch.slurm import LaunchError, torch_env_from_slurm

_REQUIRED = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def distributed_env(launcher: str, env: dict[str, str] | None = None) -> dict[str, str]:
    """RANK / WORLD_SIZE / LOCAL_RANK / MASTER_* for this process, checked before any process group is created."""
    env = dict(os.environ if env is None else env)
    if launcher == "slurm":
        env.update(torch_env_from_slurm(env))
    missing = [name for name in _REQUIRED if not env.get(name)]
    if missing:
        raise LaunchError(
            f"{', '.join(missing)} not set: start this under torchrun, the deepspeed launcher or launch/local.sh "
            "(or pass --launcher slurm inside an srun step)"
        )
    env.setdefault("LOCAL_RANK", "0")
    return env


def run_check() -> bool:
    """All-reduce and all-gather over the default group; prints one line per rank; True when the sum is right."""
    rank, world = dist.get_rank(), dist.get_world_size()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device("cuda", local_rank) if dist.get_backend() == "nccl" else torch.device("cpu")
    value = torch.tensor([float(rank + 1)], device=device)
    dist.all_reduce(value)
    expected = world * (world + 1) / 2
    hosts: list[str | None] = [None] * world
    dist.all_gather_object(hosts, socket.gethostname())
    node = os.environ.get("SLURMD_NODENAME", "-")
    ok = float(value.item()) == expected
    print(
        f"check_dist rank={rank} world={world} local_rank={local_rank} host={socket.gethostname()} node={node} "
        f"backend={dist.get_backend()} all_reduce={value.item():g} expected={expected:g} "
        f"{'ok' if ok else 'MISMATCH'}",
        flush=True,
    )
    if rank == 0:
        print(f"check_dist hosts={sorted(set(hosts))}", flush=True)
    return ok


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m launch.check_dist", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--launcher",
        choices=("env", "slurm"),
        default="env",
        help="env: RANK/WORLD_SIZE/MASTER_* set by torchrun or deepspeed; slurm: map SLURM_PROCID/NTASKS/LOCALID",
    )
    parser.add_argument(
        "--timeout-s", type=float, default=120.0, help="process-group init / collective timeout"
    )
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    ns = parser.parse_args(argv)
    try:
        env = distributed_env(ns.launcher)
    except LaunchError as exc:
        print(f"check_dist: error: {exc}", file=sys.stderr)
        return 2
    os.environ.update(env)
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(env["LOCAL_RANK"]))
    dist.init_process_group(backend, timeout=datetime.timedelta(seconds=ns.timeout_s))
    try:
        ok = run_check()
        dist.barrier()
    finally:
        dist.destroy_process_group()
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
