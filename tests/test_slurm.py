"""Real two-node SLURM jobs on the local cluster (launch/ci/local_slurm.sh start): 2 nodes x 1 CPU process, gloo.

- check_dist through launch/slurm/train.sbatch (deepspeed launcher) and train_torchrun.sbatch: the all-reduce over
  both nodes equals the closed-form sum, and the ranks ran on n1 and n2;
- the preemption path with a stand-in trainer: the batch shell's SIGUSR1 reaches both ranks through srun and the
  launcher, exit code 75 requeues the job, and the second run gets --resume auto;
- the real trainer (training/train.py; skipped until it exists): train + save, resume, preempt -> save -> requeue ->
  finish, each compared with what an uninterrupted run must produce (steps, per-rank ZeRO-3 shards).

SLURM delays a requeued job by 120 s (its BeginTime); the tests release it at once with `scontrol update StartTime=now`.
"""

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slurm

REPO_ROOT = Path(__file__).resolve().parent.parent
CPU_JOB = ["-N2", "--ntasks-per-node=1", "--gpus-per-node=0", "--cpus-per-task=1", "--time=15"]

FAKE_TRAINER = '''
"""Stand-in trainer: waits for SIGUSR1 and exits 75 (preempted); run with --resume auto it exits 0."""
import os, signal, sys, time

received = []
signal.signal(signal.SIGUSR1, lambda signum, frame: received.append(signum))
out = os.environ["FAKE_OUT"]
tag = f"rank{os.environ['RANK']}-restart{os.environ.get('SLURM_RESTART_COUNT', '0')}"
with open(f"{out}/{tag}.args", "w") as fh:
    fh.write(" ".join(sys.argv[1:]))
if sys.argv[-2:] == ["--resume", "auto"]:
    sys.exit(0)
for _ in range(1200):
    if received:
        open(f"{out}/{tag}.signal", "w").write(os.environ.get("SLURMD_NODENAME", "?"))
        sys.exit(75)
    time.sleep(0.1)
sys.exit(3)
'''


def _job_env(subprocess_env, tmp_path, **extra) -> dict:
    env = {k: v for k, v in subprocess_env.items() if not k.startswith("SLURM_")}
    env.update(ETT_PYTHON=sys.executable, ETT_LOG_DIR=str(tmp_path / "logs"), OMP_NUM_THREADS="1")
    env.update(extra)
    return env


def submit(script: str, args: list[str], env: dict, out: Path, sbatch_args: tuple[str, ...] = ()) -> str:
    out.parent.mkdir(parents=True, exist_ok=True)
    cmd = ["sbatch", "--parsable", *CPU_JOB, *sbatch_args, f"--output={out}", f"launch/slurm/{script}", *args]
    proc = subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=60, check=True)
    return proc.stdout.strip().split(";")[0]


def job_info(job_id: str) -> dict[str, str]:
    out = subprocess.run(
        ["scontrol", "show", "job", job_id], capture_output=True, text=True, timeout=30
    ).stdout
    return dict(re.findall(r"(\w+)=(\S*)", out))


def wait_for_job(job_id: str, out: Path, timeout_s: float, release_requeued: bool = False) -> dict[str, str]:
    """Poll until the job has finished (a requeued job is released from SLURM's 120 s requeue delay on the way)."""
    deadline = time.time() + timeout_s
    held_since = None
    while time.time() < deadline:
        info = job_info(job_id)
        state = info.get("JobState")
        if state in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY"):
            return info
        if release_requeued and state == "PENDING" and info.get("Reason") == "BeginTime":
            held_since = held_since or time.time()
            # slurmd compares a relaunch's credential with the first run's revocation at 1-s resolution: a job
            # released within the same second is killed ("Job credential revoked") and ends FAILED. SLURM's own
            # requeue delay is 120 s; 3 s and idle nodes are enough here.
            if time.time() - held_since > 3 and _nodes_idle():
                subprocess.run(
                    ["scontrol", "update", f"JobId={job_id}", "StartTime=now"], check=True, timeout=30
                )
                held_since = None
        time.sleep(0.3)
    subprocess.run(["scancel", job_id], timeout=30)
    log = out.read_text() if out.exists() else "(no output)"
    pytest.fail(
        f"job {job_id} did not finish within {timeout_s} s: {job_info(job_id).get('JobState')}\n{log[-4000:]}"
    )


def _nodes_idle() -> bool:
    states = subprocess.run(
        ["sinfo", "-h", "-N", "-o", "%t"], capture_output=True, text=True, timeout=30
    ).stdout.split()
    return bool(states) and all(state == "idle" for state in states)


def read_logs(tmp_path: Path, out: Path) -> str:
    texts = [out.read_text()] if out.exists() else []
    ranks = tmp_path / "logs" / "ranks"
    if ranks.is_dir():
        texts += [p.read_text(errors="replace") for p in sorted(ranks.rglob("*")) if p.is_file()]
    return "\n".join(texts)


def _check_dist_on_two_nodes(script, subprocess_env, tmp_path):
    out = tmp_path / "job.out"
    job = submit(script, [], _job_env(subprocess_env, tmp_path, ETT_MODULE="launch.check_dist"), out)
    info = wait_for_job(job, out, timeout_s=240)
    logs = read_logs(tmp_path, out)
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", logs[-4000:]
    lines = sorted(set(re.findall(r"^check_dist rank=.*$", logs, flags=re.M)))
    assert len(lines) == 2, logs[-4000:]
    assert [line.split()[1] for line in lines] == ["rank=0", "rank=1"]
    assert {re.search(r"node=(\S+)", line)[1] for line in lines} == {"n1", "n2"}
    assert all("world=2" in line and "all_reduce=3 expected=3 ok" in line for line in lines)
    assert (tmp_path / "logs" / "hostfile").read_text() == "n1 slots=1\nn2 slots=1\n"


def test_check_dist_two_nodes_deepspeed_launcher(subprocess_env, tmp_path):
    _check_dist_on_two_nodes("train.sbatch", subprocess_env, tmp_path)


@pytest.mark.slow
def test_check_dist_two_nodes_torchrun(subprocess_env, tmp_path):
    _check_dist_on_two_nodes("train_torchrun.sbatch", subprocess_env, tmp_path)


def test_preemption_signal_requeues_with_resume_auto(subprocess_env, tmp_path):
    (tmp_path / "fake_trainer.py").write_text(FAKE_TRAINER)
    env = _job_env(subprocess_env, tmp_path, ETT_MODULE="fake_trainer", FAKE_OUT=str(tmp_path))
    env["PYTHONPATH"] = f"{tmp_path}{os.pathsep}{env['PYTHONPATH']}"
    out = tmp_path / "job.out"
    job = submit("train.sbatch", ["--config", "x.yaml"], env, out)
    deadline = time.time() + 180
    while len(list(tmp_path.glob("rank*-restart0.args"))) < 2:
        assert time.time() < deadline and job_info(job).get("JobState") in ("PENDING", "RUNNING"), read_logs(
            tmp_path, out
        )
        time.sleep(0.3)
    subprocess.run(["scancel", "--signal=USR1", "--batch", job], check=True, timeout=30)
    info = wait_for_job(job, out, timeout_s=240, release_requeued=True)
    logs = read_logs(tmp_path, out)
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "1", logs[-4000:]
    assert sorted(p.read_text() for p in tmp_path.glob("rank*-restart0.signal")) == ["n1", "n2"]
    for rank in (0, 1):
        assert (tmp_path / f"rank{rank}-restart0.args").read_text() == "--local_rank=0 --config x.yaml"
        assert (
            tmp_path / f"rank{rank}-restart1.args"
        ).read_text() == "--local_rank=0 --config x.yaml --resume auto"
    assert "launcher exit code 75" in logs and "requeueing job" in logs


# ---- the real trainer --------------------------------------------------------------------------------------------

needs_trainer = pytest.mark.skipif(
    not (REPO_ROOT / "training" / "train.py").is_file()
    or not (REPO_ROOT / "data_pipeline" / "synthetic.py").is_file(),
    reason="training/train.py or data_pipeline/synthetic.py does not exist yet",
)


@pytest.fixture(scope="module")
def tiny_config(tmp_path_factory):
    """tests/configs/slurm_tiny.yaml with a freshly generated synthetic data set."""
    import yaml

    root = tmp_path_factory.mktemp("slurm_train")
    data = root / "data"
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "OMP_NUM_THREADS": "1"}
    subprocess.run(
        [
            sys.executable,
            "-m",
            "data_pipeline.synthetic",
            "--out",
            str(data),
            "--num-train",
            "64",
            "--num-eval",
            "8",
        ],
        cwd=REPO_ROOT,
        env=env,
        check=True,
        capture_output=True,
        timeout=300,
    )
    cfg = yaml.safe_load((REPO_ROOT / "tests" / "configs" / "slurm_tiny.yaml").read_text())
    cfg["data"]["train"] = [{"path": str(data / "caption_train")}]
    cfg["data"]["text_tokenizer"] = str(data / "tokenizer")
    path = root / "slurm_tiny.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _train_job(config, run_dir, tmp_path, subprocess_env, overrides, timeout_s, preempt=False):
    out = tmp_path / "job.out"
    args = ["--config", str(config), f"train.output_dir={run_dir}", *overrides]
    job = submit("train.sbatch", args, _job_env(subprocess_env, tmp_path), out)
    if preempt:
        # Signal until both ranks report it: a signal before the trainer installs its handler is ignored.
        deadline = time.time() + timeout_s
        while read_logs(tmp_path, out).count("received SIGUSR1") < 2:
            assert time.time() < deadline, read_logs(tmp_path, out)[-4000:]
            if job_info(job).get("JobState") == "RUNNING" and (run_dir / "config.yaml").exists():
                subprocess.run(["scancel", "--signal=USR1", "--batch", job], timeout=30)
            time.sleep(2)
    info = wait_for_job(job, out, timeout_s, release_requeued=preempt)
    logs = read_logs(tmp_path, out)
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", logs[-6000:]
    return info, logs


def _rank_shards(run_dir: Path) -> list[str]:
    return sorted(
        {
            re.sub(r"^.*(zero_pp_rank_\d+).*$", r"\1", p.name)
            for p in run_dir.rglob("*zero_pp_rank_*model_states.pt")
        }
    )


@needs_trainer
@pytest.mark.slow
def test_train_save_then_resume_in_a_second_job(tiny_config, subprocess_env, tmp_path):
    run_dir = tmp_path / "run"
    _, logs = _train_job(tiny_config, run_dir, tmp_path / "a", subprocess_env, ["schedule.max_steps=2"], 600)
    assert json.loads((run_dir / "DONE").read_text())["step"] == 2, logs[-4000:]
    assert _rank_shards(run_dir) == ["zero_pp_rank_0", "zero_pp_rank_1"]
    (run_dir / "DONE").unlink()
    _, logs = _train_job(
        tiny_config,
        run_dir,
        tmp_path / "b",
        subprocess_env,
        ["schedule.max_steps=4", "--resume", "auto"],
        600,
    )
    assert re.search(r"resumed from \S+ at step 2", logs), logs[-4000:]
    assert json.loads((run_dir / "DONE").read_text())["step"] == 4


@needs_trainer
@pytest.mark.slow
def test_preempted_training_saves_requeues_and_finishes(tiny_config, subprocess_env, tmp_path):
    run_dir = tmp_path / "run"
    info, logs = _train_job(
        tiny_config, run_dir, tmp_path, subprocess_env, ["schedule.max_steps=30"], 900, preempt=True
    )
    assert info["Restarts"] == "1", logs[-4000:]
    saved = re.search(r"saving at step (\d+) and exiting", logs)
    resumed = re.search(r"resumed from \S+ at step (\d+)", logs)
    assert saved and resumed and saved[1] == resumed[1], logs[-4000:]
    assert 0 < int(saved[1]) < 30
    assert json.loads((run_dir / "DONE").read_text())["step"] == 30
