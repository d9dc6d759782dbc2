"""The one GPU command on CPU: `benchmarks/gpu_check.sh --smoke` runs every part at tiny sizes and writes its
summary; the GPU tests collect on a machine without the optional packages; and the FLOP accounting behind its
MFU (training/flops.py, benchmarks/codebook_lookup.py) agrees with torch's FlopCounterMode."""

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from tests.conftest import REPO_ROOT, child_env

PARTS = (
    "install",
    "env",
    "data",
    "gpu_tests",
    "kernel_bench",
    "gpu_train_test",
    "train_ours",
    "train_baseline",
)

# Missing on the bare GPU machine until gpu_wheels/ is installed. (scipy is not simulated: tests/test_tokenizer.py
# imports it at the top; gpu_check.sh collects with --continue-on-collection-errors.)
BARE_MACHINE_MISSING = ("deepspeed", "simplejpeg", "datasets", "flash_attn", "pydantic", "hjson")

HIDE_PACKAGES = '''
import importlib.machinery, os, sys
HIDDEN = frozenset(os.environ["ETT_HIDE_PACKAGES"].split(","))
class Hiding:
    """PathFinder that finds nothing for the hidden top-level packages (find_spec is None, import fails)."""
    def __init__(self, inner):
        self.inner = inner
    def find_spec(self, name, path=None, target=None):
        return None if name.partition(".")[0] in HIDDEN else self.inner.find_spec(name, path, target)
    def __getattr__(self, attr):
        return getattr(self.inner, attr)
sys.meta_path[:] = [Hiding(f) if f is importlib.machinery.PathFinder else f for f in sys.meta_path]
'''


def _probe_wheel(folder: Path) -> Path:
    """A minimal pure-python wheel (package ett_gpu_check_probe), to check the install path of gpu_check.sh."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "ett_gpu_check_probe-1.0-py3-none-any.whl"
    dist = "ett_gpu_check_probe-1.0.dist-info"
    files = {
        "ett_gpu_check_probe/__init__.py": "__version__ = '1.0'\n",
        f"{dist}/METADATA": "Metadata-Version: 2.1\nName: ett-gpu-check-probe\nVersion: 1.0\n",
        f"{dist}/WHEEL": "Wheel-Version: 1.0\nGenerator: tests\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    files[f"{dist}/RECORD"] = "".join(f"{name},,\n" for name in files) + f"{dist}/RECORD,,\n"
    with zipfile.ZipFile(path, "w") as archive:
        for name, text in files.items():
            archive.writestr(name, text)
    return path


@pytest.mark.slow
def test_gpu_check_smoke_mode_reports_every_part(tmp_path):
    out, work = tmp_path / "out", tmp_path / "work"
    _probe_wheel(tmp_path / "wheels")
    env = child_env({"GPU_CHECK_WHEELS": str(tmp_path / "wheels"), "GPU_CHECK_WORK": str(work),
                     "PYTHON": sys.executable})  # fmt: skip
    for key in ("OUT", "ETT_PEAK_TFLOPS", "TRITON_INTERPRET"):
        env.pop(key, None)
    env["GPU_CHECK_BUDGET_S"] = "900"  # about 90 s on an idle 2-core machine; room for a loaded CI machine
    proc = subprocess.run(["bash", "benchmarks/gpu_check.sh", "--smoke", str(out)], cwd=REPO_ROOT, env=env,
                          capture_output=True, text=True, timeout=1200)  # fmt: skip
    output = proc.stdout[-6000:] + proc.stderr[-3000:]
    assert sorted(p.name for p in out.iterdir()) == [
        "env.json",
        "logs.tar.gz",
        "parts.jsonl",
        "results.json",
        "summary.md",
    ], output
    parts = [json.loads(line) for line in (out / "parts.jsonl").read_text().splitlines()]
    assert [p["part"] for p in parts] == list(PARTS), output
    assert all(p["status"] == "ok" for p in parts), [
        (p["part"], p["status"], p.get("log_tail")) for p in parts
    ]
    assert proc.returncode == 0, output

    summary = (out / "summary.md").read_text()
    assert "CPU smoke mode" in summary
    for part in PARTS:
        assert f"| {part} | ok |" in summary, part
    results = json.loads((out / "results.json").read_text())["results"]
    # The wheel folder went into the scratch site directory, which the parts had on PYTHONPATH.
    assert (work / "site" / "ett_gpu_check_probe" / "__init__.py").is_file()
    assert "installed into" in json.loads((out / "results.json").read_text())["meta"]["wheels"]
    # The GPU tests were collected (the bare-machine check is the next test), the training-step test separately.
    assert results["gpu_tests"]["collected"] >= 2 and not results["gpu_tests"]["collection_errors"]
    assert any("test_triton_codebook_kernels" in t for t in results["gpu_tests"]["test_ids"])
    assert results["gpu_train_test"]["test_ids"] == [
        "tests/test_gpu.py::test_ett_bf16_training_steps_on_cuda"
    ]
    # Kernel benchmark: every method, the Triton kernels under the interpreter, against the measured peak.
    bench = results["kernel_bench"]
    methods = {(r["pass_"], r["method"]) for r in bench["rows"] if r["status"] == "ok"}
    for pass_name in ("fwd", "fwd+bwd"):
        assert (pass_name, "triton") in methods and (pass_name, "chunked matmul (input dtype)") in methods
    assert bench["matmul_tflops"] > 0 and all(r["executed_flops"] > 0 for r in bench["rows"])
    # Training: one arm per part; the kernel benchmark's peak gave an MFU, the FLOPs have their breakdown.
    ours, baseline = results["train_ours"]["arms"]["ours"], results["train_baseline"]["arms"]["baseline"]
    assert set(results["train_ours"]["arms"]) == {"ours"} and ours["timed_steps"] == 2
    assert ours["mfu"] is not None and ours["mfu"] > 0 and baseline["tokens_per_s"] > 0
    assert ours["flops_breakdown_first_micro_batch"]["forward_flops"] > 0
    # Same weights and the same first batch in both arms: the HF Trainer baseline computes the same loss.
    assert abs(ours["first_loss"] - baseline["first_loss"]) <= 1e-5, (ours["first_loss"], baseline["first_loss"])
    assert "## Training throughput" in summary and "## Kernel benchmark" in summary


def test_gpu_tests_collect_without_the_optional_packages(tmp_path):
    """`pytest -m gpu` on a machine without deepspeed, datasets, simplejpeg or flash-attn: every
    test module still imports, so the GPU tests are collected (simulated by hiding the packages)."""
    (tmp_path / "sitecustomize.py").write_text(HIDE_PACKAGES)
    env = child_env({"ETT_HIDE_PACKAGES": ",".join(BARE_MACHINE_MISSING)})
    env["PYTHONPATH"] = str(tmp_path) + os.pathsep + env["PYTHONPATH"]
    check = subprocess.run([sys.executable, "-c", "import importlib.util as u; import sys; "
                            "sys.exit(u.find_spec('deepspeed') is not None or u.find_spec('datasets') is not None)"],
                           cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=60)  # fmt: skip
    assert check.returncode == 0, "the packages are not hidden: " + check.stderr[-2000:]
    proc = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-m", "gpu", "-p", "no:cacheprovider"],
                          cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300)  # fmt: skip
    output = proc.stdout[-6000:] + proc.stderr[-3000:]
    assert proc.returncode == 0, output
    assert "error" not in proc.stdout.lower().split("short test summary")[-1], output
    assert (
        "tests/test_gpu.py::test_triton_codebook_kernels_match_chunked_reference_at_paper_size" in proc.stdout
    )
    assert "tests/test_gpu.py::test_ett_bf16_training_steps_on_cuda" in proc.stdout


_COUNT_BOTH_BACKENDS = """
import json, torch
from modeling.kernels import codebook_argmax, codebook_entropy_loss, ibq_straight_through
from training.flops import count_forward_flops, last_forward_count

def forward(backend):
    z = torch.randn(40, 24, requires_grad=True)
    codebook = torch.randn(96, 24, requires_grad=True)
    z_q, _ = ibq_straight_through(z, codebook, backend=backend)
    entropy = codebook_entropy_loss(z, codebook, 0.01, backend=backend)
    codebook_argmax(z.detach(), codebook.detach(), -0.5 * codebook.detach().pow(2).sum(-1), backend=backend)
    return z_q.square().mean() + entropy

result = {}
for backend in ("torch", "triton"):
    flops, _ = count_forward_flops(forward, backend)
    result[backend] = {"flops": flops, **{k: v for k, v in last_forward_count().items() if k != "codebook_calls"}}
print(json.dumps(result))
"""


def test_triton_codebook_flops_are_counted_as_on_the_torch_path():
    """FlopCounterMode does not see Triton launches; count_forward_flops adds them analytically, so the count
    (and MFU) is the same whichever backend runs: IBQ forward z·Cᵀ + S·C (4NKD), entropy z·Cᵀ twice (4NKD), the
    VQ argmax z·Cᵀ (2NKD). The kernels themselves execute 16NKD + 14NKD + 2NKD forward + backward."""
    proc = subprocess.run([sys.executable, "-c", _COUNT_BOTH_BACKENDS], cwd=REPO_ROOT,
                          env=child_env({"TRITON_INTERPRET": "1"}), capture_output=True, text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    counts = json.loads(proc.stdout.strip().splitlines()[-1])
    nkd = 40 * 96 * 24
    torch_path, triton_path = counts["torch"], counts["triton"]
    assert torch_path["codebook_forward_flops"] == 0 and triton_path["torch_forward_flops"] < nkd
    assert torch_path["torch_forward_flops"] >= 10 * nkd  # the chunked torch GEMMs, seen by the counter
    assert triton_path["codebook_forward_flops"] == 10 * nkd
    assert triton_path["flops"] == torch_path["flops"]
    assert triton_path["codebook_executed_flops_fwd_bwd"] == (16 + 14 + 2) * nkd


def test_mfu_peak_env_override_and_none_on_cpu(monkeypatch):
    import training.flops as flops

    monkeypatch.setattr(flops, "_PEAK", None)
    monkeypatch.delenv("ETT_PEAK_TFLOPS", raising=False)
    if not torch.cuda.is_available():
        assert flops.peak_flops_per_second() is None and flops.mfu(1e12, 1.0) is None
    monkeypatch.setenv("ETT_PEAK_TFLOPS", "2.5")
    assert flops.peak_info(refresh=True)["source"] == "env"
    assert flops.mfu(1e12, 1.0) == pytest.approx(0.4)
    monkeypatch.setattr(flops, "_PEAK", None)
    assert flops.measure_matmul_peak("cpu", torch.float32, size=128, iters=2, trials=1) > 0


def test_codebook_benchmark_executed_flops_match_the_counter_and_chunked_matmul_matches(monkeypatch):
    """EXECUTED_NKD of the torch methods is what FlopCounterMode counts (cdist has no counter formula; Triton is
    not seen), and the chunked-matmul baseline (in chunks of 7 rows here) computes the same indices and IBQ
    gradients as the chunked torch path."""
    from benchmarks import codebook_lookup as bench

    monkeypatch.setitem(bench.CHUNK_BYTES, "cpu", 7 * 4 * 160)

    n, k, dim = 48, 160, 16
    gen = torch.Generator().manual_seed(0)
    z, codebook = torch.randn(n, dim, generator=gen), torch.randn(k, dim, generator=gen)
    device = torch.device("cpu")
    for pass_name, methods in (
        ("fwd", bench.forward_methods(device)),
        ("fwd+bwd", bench.train_methods(device)),
    ):
        for method, fn in methods.items():
            if method in ("naive cdist+argmin", "triton"):
                continue
            zz, cc = z, codebook
            if pass_name == "fwd+bwd":
                zz, cc = z.clone().requires_grad_(True), codebook.clone().requires_grad_(True)
            with FlopCounterMode(display=False) as counter:
                fn(zz, cc)
            assert counter.get_total_flops() == bench.EXECUTED_NKD[pass_name][method] * n * k * dim, method

    indices, lse = bench.chunked_matmul_argmax(z, codebook)
    expected = (z @ codebook.T).float()
    assert torch.equal(indices, expected.argmax(1))
    torch.testing.assert_close(lse, expected.logsumexp(1))
    grad = torch.randn(n, dim, generator=gen)
    grads = []
    for fn in (bench.chunked_matmul_ibq, lambda a, b: bench.ibq_straight_through(a, b, backend="torch")):
        zz, cc = z.clone().requires_grad_(True), codebook.clone().requires_grad_(True)
        z_q, _ = fn(zz, cc)
        z_q.backward(grad)
        grads.append((z_q.detach(), zz.grad, cc.grad))
    for actual, reference in zip(*grads):
        torch.testing.assert_close(actual, reference, atol=1e-4, rtol=1e-4)
