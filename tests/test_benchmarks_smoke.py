"""Smoke tests of the benchmarks: each runs at its smallest size in a subprocess and writes its JSON. No timing
assertions (performance targets live in the benchmarks themselves)."""

import json
import subprocess
import sys

from tests.conftest import REPO_ROOT, child_env


def test_checkpoint_benchmark_small_runs(tmp_path):
    out = tmp_path / "checkpoint.json"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "benchmarks.checkpoint",
            "--size",
            "small",
            "--save-repeats",
            "2",
            "--json",
            str(out),
        ],
        cwd=REPO_ROOT,
        env=child_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    for key in ("save_seconds", "checkpoint_bytes", "load_seconds", "export_seconds", "export_peak_rss_bytes",
                "fp32_model_bytes", "machine", "versions", "date", "git_commit"):  # fmt: skip
        assert key in result, key
    assert result["machine"]["cpu_count"] >= 1 and result["versions"]["deepspeed"]
    # The loaded checkpoint's weights (and optimizer state) are bitwise the saved ones, and the fresh engine
    # started from different weights, so the comparison is not vacuous.
    assert result["weights_match"] is True
    assert result["optimizer_state_match"] is True
    assert result["load"]["weights_differing_before_load"] > 0
    assert result["load"]["weights_compared"] > 0 and result["load"]["rng_match"] is True
    assert result["checkpoint_bytes"] > result["fp32_model_bytes"]
    assert result["export"]["export_files"]["llm/model.safetensors"] > 0


def test_real_shape_small_runs(tmp_path):
    """benchmarks/real_shape.py at its reduced size: one Trainer-driven ZeRO-3 ETT step per --steps, its JSON."""
    out = tmp_path / "real_shape.json"
    cmd = [
        sys.executable,
        "-m",
        "benchmarks.real_shape",
        "--size",
        "small",
        "--steps",
        "1",
        "--json",
        str(out),
    ]
    proc = subprocess.run(cmd, cwd=REPO_ROOT, env=child_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert len(result["steps"]) == 1 and result["steps"][0]["seconds"] > 0
    assert result["steps"][0]["loss"] == result["steps"][0]["terms"]["loss/total"] > 0
    assert result["parameters"]["total"] == sum(v for k, v in result["parameters"].items() if k != "total")
    assert {"tokenizer", "llm", "projector"} <= set(result["parameters"])
    assert (
        result["peak_rss_bytes"] >= result["peak_rss_after_build_bytes"] > 0 and result["build_seconds"] > 0
    )
    assert result["shape"]["codes_per_image"] == 18 and "step 1/1" in proc.stdout
    assert "aborted" not in result and result["fits_24_gib"] is True
