"""launch/: hostfile, topology checks, SLURM -> torch.distributed mapping, launcher commands; no cluster needed.

References: DeepSpeed's own hostfile parser and argument parser read what we write; check_dist's all-reduce runs
for real under launch/local.sh (2 CPU processes over gloo).
"""

import os
import subprocess
import sys

import pytest

from launch.check_dist import distributed_env
from launch.check_dist import main as check_dist_main
from launch.slurm import (
    LaunchError,
    SlurmJob,
    check_topology,
    deepspeed_node_command,
    read_hostfile,
    tasks_per_node_list,
    torch_env_from_slurm,
    torchrun_node_command,
    write_hostfile,
)

JOB_ENV = {"SLURM_JOB_ID": "41", "SLURM_JOB_NODELIST": "n[1-2]", "SLURM_JOB_NUM_NODES": "2"}


def test_hostfile_is_read_back_by_deepspeed(tmp_path):
    from deepspeed.launcher.runner import fetch_hostfile

    path = write_hostfile(tmp_path / "hostfile", ["gpu-a", "gpu-b", "gpu-c"], slots=4)
    assert dict(fetch_hostfile(str(path))) == {"gpu-a": 4, "gpu-b": 4, "gpu-c": 4}
    assert read_hostfile(path) == {"gpu-a": 4, "gpu-b": 4, "gpu-c": 4}
    assert list(read_hostfile(path)) == ["gpu-a", "gpu-b", "gpu-c"]


def test_missing_and_malformed_hostfile(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothere"):
        read_hostfile(tmp_path / "nothere")
    bad = tmp_path / "bad"
    bad.write_text("# comment\nn1 slots=2\nn2 gpus=2\n")
    with pytest.raises(LaunchError, match=r"line 3: expected 'HOST slots=N'"):
        read_hostfile(bad)
    bad.write_text("n1 slots=2\nn1 slots=2\n")
    with pytest.raises(LaunchError, match="listed twice"):
        read_hostfile(bad)
    bad.write_text("\n# nothing\n")
    with pytest.raises(LaunchError, match="lists no host"):
        read_hostfile(bad)


def test_topology_checks():
    job = SlurmJob(job_id=7, nodelist="n[1-2]", num_nodes=2, node_id=1, node_name="n2")
    assert check_topology({"n1": 2, "n2": 2}, job, ["n1", "n2"], visible_gpus=2) == 1
    assert check_topology({"n1": 2, "n2": 2}, job, ["n1", "n2"], visible_gpus=None) == 1
    with pytest.raises(LaunchError, match="lists 3 hosts but the job has SLURM_JOB_NUM_NODES=2"):
        check_topology({"n1": 2, "n2": 2, "n3": 2}, job, ["n1", "n2"], visible_gpus=2)
    with pytest.raises(LaunchError, match="gives n2 4 slots but this node sees 2 GPUs"):
        check_topology({"n1": 4, "n2": 4}, job, ["n1", "n2"], visible_gpus=2)
    with pytest.raises(LaunchError, match=r"\['x9'\], which are not in this job"):
        check_topology({"n1": 2, "x9": 2}, job, ["n1", "n2"], visible_gpus=2)
    with pytest.raises(LaunchError, match="puts n1 at node rank 1 but this node is n2"):
        check_topology({"n2": 2, "n1": 2}, job, ["n1", "n2"], visible_gpus=2)


def test_missing_slurm_environment_is_a_clear_error():
    with pytest.raises(
        LaunchError, match="SLURM_JOB_ID, SLURM_JOB_NODELIST, SLURM_JOB_NUM_NODES are not set"
    ):
        SlurmJob.from_env({})
    with pytest.raises(LaunchError, match="SLURM_JOB_NUM_NODES='two' is not an integer"):
        SlurmJob.from_env({**JOB_ENV, "SLURM_JOB_NUM_NODES": "two"})
    with pytest.raises(LaunchError, match="SLURM_PROCID"):
        torch_env_from_slurm({"SLURM_JOB_ID": "3"})


def test_node_launcher_outside_slurm_fails_before_any_process_group(tmp_path, subprocess_env):
    env = {k: v for k, v in subprocess_env.items() if not k.startswith("SLURM")}
    hostfile = write_hostfile(tmp_path / "hostfile", ["n1"], 1)
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "launch.slurm",
            "node",
            "--hostfile",
            str(hostfile),
            "--",
            "launch.check_dist",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 2
    assert "the SLURM launcher was requested but SLURM_JOB_ID" in out.stderr
    assert "Traceback" not in out.stderr


def test_slurm_task_mapping_matches_srun_layout():
    """2 nodes x 3 tasks: SLURM_PROCID / LOCALID become RANK / LOCAL_RANK; MASTER_* kept when exported."""
    assert tasks_per_node_list("2(x3),1") == [2, 2, 2, 1]
    assert tasks_per_node_list("4") == [4]
    with pytest.raises(LaunchError, match="cannot parse"):
        tasks_per_node_list("2[x3]")
    env = {
        "SLURM_JOB_ID": "9",
        "SLURM_JOB_NODELIST": "n[1-2]",
        "SLURM_PROCID": "4",
        "SLURM_NTASKS": "6",
        "SLURM_LOCALID": "1",
        "SLURM_NODEID": "1",
        "SLURM_STEP_TASKS_PER_NODE": "3(x2)",
        "MASTER_ADDR": "n1",
        "MASTER_PORT": "23456",
    }
    assert torch_env_from_slurm(env) == {
        "RANK": "4",
        "WORLD_SIZE": "6",
        "LOCAL_RANK": "1",
        "LOCAL_WORLD_SIZE": "3",
        "MASTER_ADDR": "n1",
        "MASTER_PORT": "23456",
    }
    with pytest.raises(LaunchError, match=r"SLURM_PROCID=6 is not in \[0, SLURM_NTASKS=6\)"):
        torch_env_from_slurm({**env, "SLURM_PROCID": "6"})


def test_launcher_commands_parse_with_the_real_launchers(tmp_path):
    """DeepSpeed's and torchrun's own argument parsers read the per-node commands as intended."""
    from deepspeed.launcher.runner import parse_args as ds_parse_args
    from torch.distributed.run import get_args_parser

    user_args = ["--config", "a.yaml", "optim.lr=1e-4", "--resume", "auto"]
    cmd = deepspeed_node_command(
        tmp_path / "h", 1, "n1", 29555, "training.train", user_args, rank_log_dir="L"
    )
    assert cmd[1:4] == ["-u", "-m", "deepspeed.launcher.runner"]
    ds = ds_parse_args(cmd[4:])
    assert (ds.hostfile, ds.no_ssh, ds.node_rank, ds.master_addr, ds.master_port) == (
        str(tmp_path / "h"),
        True,
        1,
        "n1",
        29555,
    )
    assert (ds.module, ds.user_script, ds.user_args, ds.enable_each_rank_log) == (
        True,
        "training.train",
        user_args,
        "L",
    )

    cmd = torchrun_node_command(3, 8, 2, "n1", 29555, "training.train", user_args)
    tr = get_args_parser().parse_args(cmd[4:])
    assert (tr.nnodes, tr.nproc_per_node, tr.node_rank, tr.master_addr, tr.master_port) == (
        "3",
        "8",
        2,
        "n1",
        29555,
    )
    assert (tr.module, tr.training_script, tr.training_script_args) == (True, "training.train", user_args)


def test_check_dist_without_distributed_env(monkeypatch, capsys):
    for name in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "SLURM_PROCID", "SLURM_JOB_ID"):
        monkeypatch.delenv(name, raising=False)
    assert check_dist_main([]) == 2
    assert "RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT not set" in capsys.readouterr().err
    assert check_dist_main(["--launcher", "slurm"]) == 2
    assert "the SLURM launcher was requested" in capsys.readouterr().err
    import torch.distributed as dist

    assert not dist.is_initialized()
    env = distributed_env("env", {"RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "h", "MASTER_PORT": "1"})
    assert env["LOCAL_RANK"] == "0"


def test_local_launch_runs_an_all_reduce_on_two_cpu_processes(repo_root, subprocess_env, tmp_path):
    env = {**subprocess_env, "ETT_LOG_DIR": str(tmp_path / "logs")}
    out = subprocess.run(
        ["bash", os.path.join(repo_root, "launch", "local.sh"), "2", "launch.check_dist"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    lines = [
        line
        for log in sorted((tmp_path / "logs" / "ranks").iterdir())
        for line in log.read_text().splitlines()
        if line.startswith("check_dist rank=")
    ]
    assert sorted(line.split()[1] for line in lines) == ["rank=0", "rank=1"]
    assert all("world=2" in line and "all_reduce=3 " in line and line.endswith(" ok") for line in lines)


def test_local_launch_rejects_a_bad_process_count(repo_root):
    out = subprocess.run(
        ["bash", os.path.join(repo_root, "launch", "local.sh"), "zero"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert out.returncode == 2
    assert "NUM_PROCESSES: a positive integer, got 'zero'" in out.stderr
