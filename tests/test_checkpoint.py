"""Checkpoints: exact resume after kill -9, world-size changes, crash during a save, a kill during the background
write, damaged shards (verification), preemption signals, the non-finite guard, and DeepSpeed's own zero_to_fp32.py
on our checkpoints. The reference is always an uninterrupted run of the same stage (ETT stage 2 with its
discriminator, ZeRO-3, fp32, constant schedule)."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.conftest import REPO_ROOT, child_env, run_ranks, start_ranks
from tests.tiny_configs import stage_config, write_stage_config
from training.checkpoint import COMPLETE_MARKER, list_complete
from training.preemption import PREEMPTED_EXIT_CODE

STEPS = 6


def _losses(run_dir) -> dict[int, float]:
    """step -> total loss; a step logged twice (before a kill and after the resume) keeps its last value. A line
    still being written (the run is live) is left out."""
    out = {}
    path = run_dir / "metrics.jsonl"
    for line in path.read_text().splitlines(keepends=True) if path.exists() else []:
        if not line.endswith("\n"):
            continue
        row = json.loads(line)
        if "loss/total" in row:
            out[row["step"]] = row["loss/total"]
    return out


@pytest.fixture(scope="module")
def handoff(tiny_data, tmp_path_factory):
    """A stage-1 hand-off directory written from a freshly initialised tiny ETT model (the start of stage 2)."""
    from modeling.ett import ETTModel
    from training.config import from_dict
    from training.export import write_export
    from training.run_config import TrainConfig

    root = tmp_path_factory.mktemp("handoff")
    cfg = from_dict(TrainConfig, stage_config("tokenizer", tiny_data, root / "unused"))
    torch.manual_seed(0)
    model = ETTModel(cfg.model.llm, cfg.model.tokenizer, cfg.model.projector, cfg.model.ett)
    state = {k: v for k, v in model.state_dict().items() if not k.startswith("vq_loss.")}
    return write_export(state, cfg, root / "final", {"stage": "stage1", "step": 0})


def _config(path, tiny_data, handoff, run_dir, **sections):
    base = {
        "stage": {"init_from": str(handoff)},
        "schedule": {"max_steps": STEPS},
        "checkpoint": {"save_every": 2, "keep_last": 5},
    }
    for key, value in sections.items():
        base[key] = {**base.get(key, {}), **value}
    return write_stage_config(path, "ett", tiny_data, run_dir, **base)


@pytest.fixture(scope="module")
def reference(tiny_data, handoff, tmp_path_factory):
    """Uninterrupted runs on 1 and 2 ranks: {nproc: run_dir}."""
    root = tmp_path_factory.mktemp("reference")
    runs = {}
    for nproc in (1, 2):
        run_dir = root / f"ref{nproc}"
        config = _config(root / f"ref{nproc}.yaml", tiny_data, handoff, run_dir)
        run_ranks(nproc, ["--config", str(config), "--resume", "none"], root)
        assert sorted(_losses(run_dir)) == list(range(1, STEPS + 1))
        runs[nproc] = run_dir
    return runs


def _wait_for_checkpoint(group, ckpt_root, step, timeout=300):
    deadline = time.time() + timeout
    target = ckpt_root / f"step{step:08d}" / COMPLETE_MARKER
    while time.time() < deadline:
        if target.exists():
            return
        if any(p.poll() not in (None, 0) for p in group.procs):
            pytest.fail(f"run died before step {step}:\n{group.output()}")
        time.sleep(0.05)
    pytest.fail(f"no checkpoint at step {step} after {timeout} s:\n{group.output()}")


@pytest.mark.parametrize("nproc", [1, 2])
def test_kill9_then_resume_is_bit_identical(nproc, reference, tiny_data, handoff, tmp_path):
    run_dir = tmp_path / "run"
    config = _config(tmp_path / "run.yaml", tiny_data, handoff, run_dir)
    group = start_ranks(nproc, ["--config", str(config), "--resume", "none"], tmp_path)
    _wait_for_checkpoint(group, run_dir / "checkpoints", 2)
    group.kill9()
    assert (run_dir / "checkpoints").exists()
    run_ranks(nproc, ["--config", str(config), "--resume", "auto"], tmp_path)
    resumed, expected = _losses(run_dir), _losses(reference[nproc])
    assert sorted(resumed) == list(range(1, STEPS + 1))
    for step in range(1, STEPS + 1):
        assert resumed[step] == expected[step], f"step {step}: {resumed[step]!r} != {expected[step]!r}"


@pytest.mark.parametrize("old, new", [(2, 1), (1, 2)])
def test_resume_on_a_different_world_size(old, new, reference, tiny_data, handoff, tmp_path):
    """Through DeepSpeed's universal checkpoint: weights and optimizer state survive and the data stream continues
    from the global sample offset. Not bitwise: the samples pending in the old ranks' packers are laid out again
    for the new world size, so rows are packed differently and the per-step mean loss moves by ~1e-4 relative
    (exactly-once delivery of every sample is tested in tests/test_data_*.py)."""
    source = reference[old] / "checkpoints" / "step00000004"
    run_dir = tmp_path / "run"
    config = _config(tmp_path / "run.yaml", tiny_data, handoff, run_dir)
    group = run_ranks(new, ["--config", str(config), "--resume", str(source)], tmp_path)
    assert "universal checkpoint" in group.output()
    resumed, expected = _losses(run_dir), _losses(reference[old])
    assert sorted(resumed) == [5, 6]
    for step in (5, 6):
        assert resumed[step] == pytest.approx(expected[step], rel=2e-3), step
    state = json.loads((run_dir / "checkpoints" / "step00000006" / "trainer_state.json").read_text())
    ref_state = json.loads(
        (reference[old] / "checkpoints" / "step00000006" / "trainer_state.json").read_text()
    )
    assert state["consumed_samples"] == ref_state["consumed_samples"]
    assert state["world_size"] == new


CRASH_DURING_SAVE = """
import sys
import deepspeed.runtime.engine as engine_module
original = engine_module.DeepSpeedEngine.save_checkpoint
def crashing_save(self, save_dir, tag=None, **kwargs):
    original(self, save_dir, tag=tag, **kwargs)
    if tag.endswith("step00000004"):
        raise SystemExit(9)  # died after writing the shards, before the checkpoint was published
engine_module.DeepSpeedEngine.save_checkpoint = crashing_save
from training.train import main
sys.exit(main(sys.argv[1:]))
"""


def test_crash_during_save_leaves_the_previous_checkpoint_loadable(reference, tiny_data, handoff, tmp_path):
    run_dir = tmp_path / "run"
    config = _config(tmp_path / "run.yaml", tiny_data, handoff, run_dir)
    crashed = subprocess.run(
        [sys.executable, "-c", CRASH_DURING_SAVE, "--config", str(config), "--resume", "none"],
        cwd=REPO_ROOT,
        env=child_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert crashed.returncode == 9, crashed.stderr[-3000:]
    ckpts = run_dir / "checkpoints"
    assert list_complete(ckpts) == ["step00000002"]
    assert (ckpts / "tmp-step00000004").is_dir()
    assert (ckpts / "latest").read_text() == "step00000002"
    group = run_ranks(1, ["--config", str(config), "--resume", "auto"], tmp_path)
    assert "incomplete checkpoint" in group.output() and "tmp-step00000004" in group.output()
    resumed, expected = _losses(run_dir), _losses(reference[1])
    for step in range(3, STEPS + 1):
        assert resumed[step] == expected[step], step


HANG_DURING_BACKGROUND_WRITE = """
import os
import pathlib
import time

import training.checkpoint as ckpt

write = ckpt.BackgroundWrite._write


def hanging_write(self, writer, queued):
    if self.tag == os.environ["ETT_TEST_HANG_TAG"]:
        _, path = queued[0]
        pathlib.Path(path).write_bytes(b"the first bytes of a shard")
        pathlib.Path(os.environ["ETT_TEST_HANG_MARKER"] + str(self.rank)).touch()
        time.sleep(3600)
    write(self, writer, queued)


ckpt.BackgroundWrite._write = hanging_write
"""


def test_kill_during_background_write_and_a_damaged_shard(reference, tiny_data, handoff, tmp_path):
    """2 ranks, a save every step. The writers of step 5 hang mid-file (a sitecustomize hook) while training goes
    on to step 6; kill -9 there: step 4 stays the newest published checkpoint. Then one byte of a rank-1 shard of
    step 4 is flipped: `--resume PATH` to it exits 2 naming the file, and `--resume auto` skips the unpublished
    step 5 and the damaged step 4 with a warning naming the file, and resumes from step 3 bit-identically."""
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(HANG_DURING_BACKGROUND_WRITE)
    run_dir = tmp_path / "run"
    ckpts = run_dir / "checkpoints"
    config = _config(tmp_path / "run.yaml", tiny_data, handoff, run_dir, checkpoint={"save_every": 1})
    marker = tmp_path / "hung-rank"
    hang_env = {
        "PYTHONPATH": os.pathsep.join([str(hook), REPO_ROOT]),
        "ETT_TEST_HANG_TAG": "step00000005",
        "ETT_TEST_HANG_MARKER": str(marker),
    }
    group = start_ranks(
        2, ["--config", str(config), "--resume", "none"], tmp_path, env_extra=hang_env, fresh_interpreter=True
    )
    deadline = time.time() + 300
    # Both writers hung and training went on to the last step (the final save then waits for step 5's).
    while not (all(Path(f"{marker}{r}").exists() for r in (0, 1)) and STEPS in _losses(run_dir)):
        assert time.time() < deadline and all(p.poll() is None for p in group.procs), group.output()
        time.sleep(0.1)
    group.kill9()
    assert not (run_dir / "DONE").exists()
    assert list_complete(ckpts) == [f"step{s:08d}" for s in range(1, 5)]
    assert (ckpts / "latest").read_text() == "step00000004"
    assert (ckpts / "tmp-step00000005").is_dir()

    damaged = ckpts / "step00000004" / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    data = bytearray(damaged.read_bytes())
    data[len(data) // 2] ^= 0xFF
    damaged.write_bytes(data)
    explicit = start_ranks(1, ["--config", str(config), "--resume", str(ckpts / "step00000004")], tmp_path)
    assert explicit.wait(300) == [2], explicit.output()
    assert f"{damaged}: crc32 differs" in explicit.output()

    group = run_ranks(2, ["--config", str(config), "--resume", "auto"], tmp_path)
    output = "".join(Path(log).read_text() for log in group.logs)
    assert (
        "tmp-step00000005" in output and f"skipping the damaged checkpoint {ckpts / 'step00000004'}" in output
    )
    assert f"{damaged}: crc32 differs" in output and f"resumed from {ckpts / 'step00000003'}" in output
    resumed, expected = _losses(run_dir), _losses(reference[2])
    for step in range(4, STEPS + 1):
        assert resumed[step] == expected[step], f"step {step}: {resumed[step]!r} != {expected[step]!r}"


def test_preemption_signal_saves_and_the_resume_continues_exactly(reference, tiny_data, handoff, tmp_path):
    run_dir = tmp_path / "run"
    config = _config(tmp_path / "run.yaml", tiny_data, handoff, run_dir, checkpoint={"save_every": 0})
    group = start_ranks(1, ["--config", str(config), "--resume", "none"], tmp_path)
    deadline = time.time() + 300
    while not (run_dir / "metrics.jsonl").exists() or not _losses(run_dir):
        assert time.time() < deadline and group.procs[0].poll() is None, group.output()
        time.sleep(0.05)
    group.signal(signal.SIGUSR1)
    assert group.wait(300) == [PREEMPTED_EXIT_CODE], group.output()
    saved = list_complete(run_dir / "checkpoints")
    assert len(saved) == 1 and int(saved[0][4:]) < STEPS
    run_ranks(1, ["--config", str(config), "--resume", "auto"], tmp_path)
    resumed, expected = _losses(run_dir), _losses(reference[1])
    assert sorted(resumed) == list(range(1, STEPS + 1))
    for step in range(1, STEPS + 1):
        assert resumed[step] == expected[step], step


def test_nonfinite_steps_are_skipped_then_the_run_stops(tiny_data, handoff, tmp_path):
    run_dir = tmp_path / "run"
    config = _config(
        tmp_path / "run.yaml",
        tiny_data,
        handoff,
        run_dir,
        optim={"lr": 1e30},
        train={"max_consecutive_nonfinite": 2},
        schedule={"max_steps": 20},
    )
    group = start_ranks(1, ["--config", str(config), "--resume", "none"], tmp_path)
    assert group.wait(600) == [3], group.output()
    output = group.output()
    assert "the update was skipped" in output
    assert "3 consecutive non-finite steps, the last at step" in output and "loss/" in output
    skipped = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert sum(1 for row in skipped if row.get("skipped/nonfinite")) == 3


def test_deepspeed_zero_to_fp32_reads_our_checkpoint(reference, tmp_path):
    """zero_to_fp32.py copied into the checkpoint directory consolidates our 2-rank checkpoint into the weights the
    model had (the stage's final hand-off, gathered from the live engine)."""
    from safetensors.torch import load_file

    from training.export import load_handoff_state_dict

    ckpts = reference[2] / "checkpoints"
    out = tmp_path / "fp32"
    subprocess.run(
        [
            sys.executable,
            str(ckpts / "zero_to_fp32.py"),
            str(ckpts),
            str(out),
            "--tag",
            f"step{STEPS:08d}",
            "--safe_serialization",
        ],
        check=True,
        cwd=REPO_ROOT,
        env=child_env(),
        capture_output=True,
        timeout=300,
    )
    consolidated = {}
    for path in sorted(out.glob("*.safetensors")):
        consolidated.update(load_file(str(path)))
    final = load_handoff_state_dict(reference[2] / "final")
    assert final and set(final) <= set(consolidated)
    for key, value in final.items():
        assert torch.equal(value, consolidated[key]), key
