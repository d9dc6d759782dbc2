"""SLURM -> multi-node launch: hostfile, rendezvous address, and the per-node launcher command.

`deepspeed --launcher slurm` alone does not set RANK / MASTER_ADDR, so the sbatch
scripts launch in two levels, like torchrun:

1. the batch shell (first node) runs `python -m launch.slurm prepare --hostfile H --slots N`: it expands
   SLURM_JOB_NODELIST with `scontrol show hostnames`, writes the hostfile (`host slots=N`, one line per node) and
   prints `export MASTER_ADDR=<first host> MASTER_PORT=<free port derived from the job id>`;
2. `srun --ntasks-per-node=1` runs `python -m launch.slurm node --hostfile H -- MODULE ARGS...` on every node: it
   checks the hostfile against the job (node count, this node's place, GPUs visible) and execs
   `deepspeed --hostfile H --no_ssh --node_rank=$SLURM_NODEID --master_addr A --master_port P -m MODULE ARGS`
   (or `torchrun --nnodes ... --node_rank ...` with `--launcher torchrun`).

Every check raises `LaunchError` (a ValueError) or FileNotFoundError naming the file / variable and what was expected,
before any process group exists. SIGUSR1 (the preemption signal, see launch/slurm/train.sbatch) is ignored by the
launcher processes and inherited as ignored by the trainer, which installs its own handler (training/preemption.py).
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

_HOSTFILE_LINE = re.compile(r"^(?P<host>\S+)\s+slots=(?P<slots>\d+)$")
MASTER_PORT_BASE = 20000
MASTER_PORT_SPAN = 20000


class LaunchError(ValueError):
    """A launch cannot proceed: inconsistent topology or a missing SLURM environment."""


@dataclass(frozen=True)
class SlurmJob:
    """The parts of a SLURM job's environment the launch needs.

    `node_id`/`node_name` are those of the node this process runs on (set for srun tasks and the batch shell).
    """

    job_id: int
    nodelist: str
    num_nodes: int
    node_id: int | None = None
    node_name: str | None = None

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> SlurmJob:
        env = os.environ if env is None else env
        required = ("SLURM_JOB_ID", "SLURM_JOB_NODELIST", "SLURM_JOB_NUM_NODES")
        missing = [name for name in required if not env.get(name)]
        if missing:
            raise LaunchError(
                f"the SLURM launcher was requested but {', '.join(missing)} "
                f"{'is' if len(missing) == 1 else 'are'} not set: run it inside a SLURM job "
                "(sbatch launch/slurm/train.sbatch ...), or use launch/local.sh on a single node"
            )
        node_id = env.get("SLURM_NODEID")
        return cls(
            job_id=_int_var(env, "SLURM_JOB_ID"),
            nodelist=env["SLURM_JOB_NODELIST"],
            num_nodes=_int_var(env, "SLURM_JOB_NUM_NODES"),
            node_id=_int_var(env, "SLURM_NODEID") if node_id else None,
            node_name=env.get("SLURMD_NODENAME"),
        )


def _int_var(env: Mapping[str, str], name: str) -> int:
    value = env[name]
    try:
        return int(value)
    except ValueError:
        raise LaunchError(f"{name}={value!r} is not an integer") from None


def expand_nodelist(nodelist: str) -> list[str]:
    """`n[1-2],gpu7` -> ["n1", "n2", "gpu7"] with `scontrol show hostnames` (SLURM's own parser)."""
    try:
        out = subprocess.run(
            ["scontrol", "show", "hostnames", nodelist],
            capture_output=True,
            text=True,
            check=False,
            timeout=60,
        )
    except FileNotFoundError:
        raise FileNotFoundError(
            "scontrol not found on PATH: the SLURM client tools are needed to expand the nodelist"
        ) from None
    if out.returncode != 0:
        raise LaunchError(f"scontrol show hostnames {nodelist!r} failed: {out.stderr.strip()}")
    hosts = out.stdout.split()
    if not hosts:
        raise LaunchError(f"scontrol show hostnames {nodelist!r} printed no host")
    return hosts


def write_hostfile(path: str | Path, hosts: Sequence[str], slots: int) -> Path:
    """DeepSpeed hostfile: one `host slots=N` line per node, N = processes (GPUs) per node."""
    if slots < 1:
        raise LaunchError(f"slots per node must be >= 1, got {slots}")
    if len(set(hosts)) != len(hosts):
        raise LaunchError(f"duplicate host in {list(hosts)}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(f"{host} slots={slots}\n" for host in hosts))
    return path


def read_hostfile(path: str | Path) -> dict[str, int]:
    """Parse a DeepSpeed hostfile into {host: slots}, in file order; comments and blank lines are skipped."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"hostfile {path} does not exist (write it with `python -m launch.slurm prepare`)"
        )
    hosts: dict[str, int] = {}
    for number, raw in enumerate(path.read_text().splitlines(), start=1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        match = _HOSTFILE_LINE.match(line)
        if match is None:
            raise LaunchError(f"{path}, line {number}: expected 'HOST slots=N', got {raw!r}")
        host, slots = match["host"], int(match["slots"])
        if host in hosts:
            raise LaunchError(f"{path}, line {number}: host {host} is listed twice")
        if slots < 1:
            raise LaunchError(f"{path}, line {number}: slots must be >= 1, got {slots}")
        hosts[host] = slots
    if not hosts:
        raise LaunchError(f"hostfile {path} lists no host")
    return hosts


def check_topology(
    hosts: Mapping[str, int],
    job: SlurmJob,
    job_hosts: Sequence[str],
    visible_gpus: int | None,
    hostfile: str | Path = "hostfile",
) -> int:
    """Check the hostfile against the SLURM job and this node; returns this node's rank (its place in the hostfile).

    Raises LaunchError when the node counts differ, a hostfile host is not in the job, this node is not where
    SLURM_NODEID says, or this node has fewer GPUs than its slots (visible_gpus None: CPU processes, no check).
    """
    if len(hosts) != job.num_nodes:
        raise LaunchError(
            f"{hostfile} lists {len(hosts)} hosts but the job has SLURM_JOB_NUM_NODES={job.num_nodes}: "
            "regenerate the hostfile for this job"
        )
    unknown = [host for host in hosts if host not in job_hosts]
    if unknown:
        raise LaunchError(f"{hostfile} lists {unknown}, which are not in this job's nodes {list(job_hosts)}")
    if job.node_id is None:
        raise LaunchError("SLURM_NODEID is not set: run the per-node launcher with srun (one task per node)")
    names = list(hosts)
    if not 0 <= job.node_id < len(names):
        raise LaunchError(f"SLURM_NODEID={job.node_id} is outside the {len(names)} hosts of {hostfile}")
    if job.node_name is not None and names[job.node_id] != job.node_name:
        raise LaunchError(
            f"{hostfile} puts {names[job.node_id]} at node rank {job.node_id} but this node is {job.node_name}: "
            "the hostfile must follow the order of `scontrol show hostnames $SLURM_JOB_NODELIST`"
        )
    slots = hosts[names[job.node_id]]
    if visible_gpus is not None and slots > visible_gpus:
        raise LaunchError(
            f"{hostfile} gives {names[job.node_id]} {slots} slots but this node sees {visible_gpus} GPUs: "
            "set GPUS_PER_NODE (and #SBATCH --gpus-per-node) to the GPUs each node has"
        )
    return job.node_id


def master_port(job_id: int, host: str = "127.0.0.1") -> int:
    """A port derived from the job id (so concurrent jobs differ), moved up until it is free on `host`."""
    port = MASTER_PORT_BASE + job_id % MASTER_PORT_SPAN
    for candidate in range(port, port + 200):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            try:
                sock.bind((host, candidate))
            except OSError:
                continue
            return candidate
    raise LaunchError(f"no free TCP port in [{port}, {port + 200}) on {host}")


def tasks_per_node_list(spec: str) -> list[int]:
    """SLURM's compressed tasks-per-node string -> one count per node: "2(x3),1" -> [2, 2, 2, 1]."""
    counts: list[int] = []
    for part in spec.split(","):
        match = re.fullmatch(r"(\d+)(?:\(x(\d+)\))?", part.strip())
        if match is None:
            raise LaunchError(f"cannot parse SLURM tasks-per-node {spec!r} (expected e.g. '2(x3),1')")
        counts += [int(match[1])] * int(match[2] or 1)
    return counts


def torch_env_from_slurm(env: Mapping[str, str] | None = None) -> dict[str, str]:
    """torch.distributed variables for a process started directly by srun (one task per process).

    RANK = SLURM_PROCID, WORLD_SIZE = SLURM_NTASKS, LOCAL_RANK = SLURM_LOCALID, LOCAL_WORLD_SIZE = tasks on this
    node; MASTER_ADDR / MASTER_PORT are kept when set, else the first job host and `master_port(job_id)`.
    """
    env = os.environ if env is None else env
    missing = [
        name
        for name in ("SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID", "SLURM_JOB_ID")
        if not env.get(name)
    ]
    if missing:
        raise LaunchError(
            f"the SLURM launcher was requested but {', '.join(missing)} not set: start the processes with srun "
            "inside a SLURM allocation"
        )
    rank, world, local_rank = (
        _int_var(env, name) for name in ("SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID")
    )
    if not 0 <= rank < world:
        raise LaunchError(f"SLURM_PROCID={rank} is not in [0, SLURM_NTASKS={world})")
    node_id = _int_var(env, "SLURM_NODEID") if env.get("SLURM_NODEID") else 0
    tasks_per_node = tasks_per_node_list(
        env.get("SLURM_STEP_TASKS_PER_NODE") or env.get("SLURM_TASKS_PER_NODE", "1")
    )
    out = {"RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(local_rank)}
    out["LOCAL_WORLD_SIZE"] = str(tasks_per_node[min(node_id, len(tasks_per_node) - 1)])
    out["MASTER_ADDR"] = env.get("MASTER_ADDR") or expand_nodelist(env["SLURM_JOB_NODELIST"])[0]
    out["MASTER_PORT"] = env.get("MASTER_PORT") or str(
        MASTER_PORT_BASE + _int_var(env, "SLURM_JOB_ID") % MASTER_PORT_SPAN
    )
    return out


def deepspeed_node_command(
    hostfile: str | Path,
    node_rank: int,
    master_addr: str,
    master_port: int,
    module: str,
    args: Sequence[str],
    rank_log_dir: str | Path | None = None,
    python: str = sys.executable,
) -> list[str]:
    """The deepspeed launcher for one node in no-ssh mode: it starts this node's `slots` processes."""
    cmd = [python, "-u", "-m", "deepspeed.launcher.runner", "--hostfile", str(hostfile), "--no_ssh"]
    cmd += [f"--node_rank={node_rank}", f"--master_addr={master_addr}", f"--master_port={master_port}"]
    if rank_log_dir is not None:
        cmd.append(f"--enable_each_rank_log={rank_log_dir}")
    return cmd + ["--module", module, *args]


def torchrun_node_command(
    num_nodes: int,
    procs_per_node: int,
    node_rank: int,
    master_addr: str,
    master_port: int,
    module: str,
    args: Sequence[str],
    rank_log_dir: str | Path | None = None,
    python: str = sys.executable,
) -> list[str]:
    """torchrun for one node with a static rendezvous on master_addr:master_port."""
    cmd = [
        python,
        "-u",
        "-m",
        "torch.distributed.run",
        f"--nnodes={num_nodes}",
        f"--nproc-per-node={procs_per_node}",
    ]
    cmd += [f"--node-rank={node_rank}", f"--master-addr={master_addr}", f"--master-port={master_port}"]
    if rank_log_dir is not None:
        cmd += [f"--log-dir={rank_log_dir}", "--tee=3"]
    return cmd + ["-m", module, *args]


def visible_gpu_count() -> int | None:
    """GPUs this process can use, or None without CUDA (CPU processes: slots are not checked against devices)."""
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else None


def node_command(
    launcher: str,
    hostfile: str | Path,
    module: str,
    args: Sequence[str],
    env: Mapping[str, str] | None = None,
    rank_log_dir: str | Path | None = None,
    visible_gpus: int | None = None,
) -> tuple[list[str], dict[str, str]]:
    """Validate this node against the job and build its launcher command and extra environment."""
    env = os.environ if env is None else env
    job = SlurmJob.from_env(env)
    for name in ("MASTER_ADDR", "MASTER_PORT"):
        if not env.get(name):
            raise LaunchError(
                f"{name} is not set: export it in the batch script (`eval $(python -m launch.slurm prepare ...)`)"
            )
    hosts = read_hostfile(hostfile)
    node_rank = check_topology(hosts, job, expand_nodelist(job.nodelist), visible_gpus, hostfile)
    slots = hosts[list(hosts)[node_rank]]
    addr, port = env["MASTER_ADDR"], _int_var(env, "MASTER_PORT")
    if launcher == "deepspeed":
        cmd = deepspeed_node_command(hostfile, node_rank, addr, port, module, args, rank_log_dir)
    elif launcher == "torchrun":
        if len(set(hosts.values())) != 1:
            raise LaunchError(f"torchrun needs the same slots on every host, {hostfile} has {hosts}")
        cmd = torchrun_node_command(len(hosts), slots, node_rank, addr, port, module, args, rank_log_dir)
    else:
        raise LaunchError(f"unknown launcher {launcher!r}: expected deepspeed or torchrun")
    return cmd, {"LOCAL_WORLD_SIZE": str(slots)}


def _prepare(ns: argparse.Namespace) -> int:
    job = SlurmJob.from_env()
    hosts = expand_nodelist(job.nodelist)
    if len(hosts) != job.num_nodes:
        raise LaunchError(
            f"SLURM_JOB_NODELIST={job.nodelist} expands to {len(hosts)} hosts but SLURM_JOB_NUM_NODES={job.num_nodes}"
        )
    write_hostfile(ns.hostfile, hosts, ns.slots)
    port = master_port(job.job_id)
    print(f"export MASTER_ADDR={shlex.quote(hosts[0])} MASTER_PORT={port} ETT_NUM_NODES={len(hosts)}")
    return 0


def _node(ns: argparse.Namespace) -> int:
    if not ns.command:
        raise LaunchError("no module given: python -m launch.slurm node --hostfile H -- MODULE [ARGS...]")
    module, *args = ns.command
    SlurmJob.from_env()
    cmd, extra_env = node_command(
        ns.launcher, ns.hostfile, module, args, rank_log_dir=ns.rank_log_dir, visible_gpus=visible_gpu_count()
    )
    env = {**os.environ, **extra_env}
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    print(f"[launch.slurm] node {os.environ.get('SLURMD_NODENAME', '?')}: {shlex.join(cmd)}", flush=True)
    os.execvpe(cmd[0], cmd, env)
    return 1


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m launch.slurm", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="action", required=True)
    prepare = sub.add_parser(
        "prepare", help="batch shell: write the hostfile, print MASTER_ADDR/MASTER_PORT exports"
    )
    prepare.add_argument("--hostfile", required=True)
    prepare.add_argument("--slots", type=int, required=True, help="processes (GPUs) per node")
    node = sub.add_parser("node", help="one srun task per node: exec the launcher for this node")
    node.add_argument("--hostfile", required=True)
    node.add_argument("--launcher", choices=("deepspeed", "torchrun"), default="deepspeed")
    node.add_argument("--rank-log-dir", default=None, help="one log file per rank in this directory")
    node.add_argument("command", nargs=argparse.REMAINDER, help="-- MODULE [ARGS...]")
    ns = parser.parse_args(argv)
    if ns.action == "node" and ns.command and ns.command[0] == "--":
        ns.command = ns.command[1:]
    try:
        return _prepare(ns) if ns.action == "prepare" else _node(ns)
    except (LaunchError, FileNotFoundError) as exc:
        print(f"launch.slurm: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
