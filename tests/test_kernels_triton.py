"""Triton codebook kernels against naive fp64 references.

On CPU the kernels run under the Triton interpreter in a child process (TRITON_INTERPRET=1 must be set before
the kernels are decorated, and must not leak into other tests), on shapes that are not multiples of the block
sizes, with and without code splits. The child saves inputs and outputs; this process computes the dense
float64 references and compares. On a GPU the same cases run compiled, at a larger shape.
"""

import os
import subprocess
import sys

import pytest
import torch

from tests.conftest import REPO_ROOT
from tests.test_kernels import assert_argmax_consistent, naive_entropy_loss, naive_ibq

INTERPRETER_CASES = {
    # name: (N, K, D, dtype, TritonConfig overrides)
    "fp32-one-split": (37, 70, 16, torch.float32, dict(block_n=16, block_k=32, num_splits=1)),
    "bf16-auto-splits": (37, 70, 16, torch.bfloat16, dict(block_n=16, block_k=32, num_splits=None)),
    "fp32-ragged-dim": (19, 45, 20, torch.float32, dict(block_n=16, block_k=16, num_splits=2)),
}
GPU_CASES = {
    "gpu-bf16": (1000, 3000, 256, torch.bfloat16, {}),
    "gpu-fp32": (1000, 3000, 256, torch.float32, {}),
}
TEMPERATURE = 0.01


def run_case(n, k, dim, dtype, overrides, device):
    """Inputs and the Triton backend's outputs for one case (forward and backward of all three ops)."""
    from dataclasses import replace

    from modeling.kernels import codebook_argmax, codebook_entropy_loss, ibq_straight_through, triton_kernels

    triton_kernels.CONFIG = replace(triton_kernels.CONFIG, **overrides)
    gen = torch.Generator().manual_seed(n * k + dim)
    z = torch.randn(n, dim, generator=gen).to(dtype).to(device)
    codebook = torch.randn(k, dim, generator=gen).to(dtype).to(device)
    bias = torch.randn(k, generator=gen).to(device)
    grad_out = torch.randn(n, dim, generator=gen).to(dtype).to(device)
    out = dict(z=z, codebook=codebook, bias=bias, grad_out=grad_out)
    out["indices"], out["lse"] = codebook_argmax(z, codebook, bias, backend="triton")

    z_leaf, codebook_leaf = z.clone().requires_grad_(True), codebook.clone().requires_grad_(True)
    z_q, out["ibq_indices"] = ibq_straight_through(z_leaf, codebook_leaf, backend="triton")
    out["z_q"] = z_q.detach()
    out["ibq_grad_z"], out["ibq_grad_codebook"] = torch.autograd.grad(z_q, [z_leaf, codebook_leaf], grad_out)

    loss = codebook_entropy_loss(z_leaf, codebook_leaf, TEMPERATURE, backend="triton")
    out["entropy_loss"] = loss.detach()
    out["entropy_grad_z"], out["entropy_grad_codebook"] = torch.autograd.grad(loss, [z_leaf, codebook_leaf])
    return {name: tensor.detach().cpu() for name, tensor in out.items()}


def run_interpreter_cases(path: str) -> None:
    """Child-process entry point (TRITON_INTERPRET=1): run every interpreter case and torch.save the results."""
    results = {name: run_case(*case, device="cpu") for name, case in INTERPRETER_CASES.items()}
    torch.save(results, path)


def assert_close_relative(actual, expected, tol, what):
    scale = expected.abs().max().clamp_min(1e-12)
    err = ((actual.double() - expected) / scale).abs().max().item()
    assert err <= tol, f"{what}: max error {err:.3g} of the largest magnitude > {tol}"


def check_case(result, grad_tol):
    z, codebook = result["z"].double(), result["codebook"].double()
    logits = z @ codebook.T
    biased = logits + result["bias"].double()
    assert_argmax_consistent(biased, result["indices"], tol=1e-3)
    assert_close_relative(result["lse"], biased.logsumexp(dim=1), 1e-5, "lse")

    assert_argmax_consistent(logits, result["ibq_indices"], tol=1e-3)
    assert torch.equal(result["z_q"], result["codebook"][result["ibq_indices"]])
    z64, codebook64 = z.clone().requires_grad_(True), codebook.clone().requires_grad_(True)
    ref_grads = torch.autograd.grad(
        naive_ibq(z64, codebook64), [z64, codebook64], result["grad_out"].double()
    )
    assert_close_relative(result["ibq_grad_z"], ref_grads[0], grad_tol, "IBQ dz")
    assert_close_relative(result["ibq_grad_codebook"], ref_grads[1], grad_tol, "IBQ dC")

    ref_loss = naive_entropy_loss(z64, codebook64, TEMPERATURE)
    ref_grads = torch.autograd.grad(ref_loss, [z64, codebook64])
    assert abs(result["entropy_loss"].item() - ref_loss.item()) <= 1e-4 * max(1.0, abs(ref_loss.item()))
    assert_close_relative(result["entropy_grad_z"], ref_grads[0], grad_tol, "entropy dz")
    assert_close_relative(result["entropy_grad_codebook"], ref_grads[1], grad_tol, "entropy dC")


@pytest.fixture(scope="module")
def interpreter_results(tmp_path_factory):
    pytest.importorskip("triton")
    path = tmp_path_factory.mktemp("triton") / "results.pt"
    env = dict(os.environ, TRITON_INTERPRET="1", OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = REPO_ROOT + os.pathsep + env.get("PYTHONPATH", "")
    code = (
        f"from tests.test_kernels_triton import run_interpreter_cases; run_interpreter_cases({str(path)!r})"
    )
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return torch.load(path)


@pytest.mark.parametrize("case", list(INTERPRETER_CASES))
def test_triton_interpreter_matches_naive(interpreter_results, case):
    bf16_outputs = INTERPRETER_CASES[case][3] == torch.bfloat16  # gradients are returned rounded to bf16
    check_case(interpreter_results[case], grad_tol=1e-2 if bf16_outputs else 1e-3)


@pytest.mark.gpu
@pytest.mark.parametrize("case", list(GPU_CASES))
def test_triton_gpu_matches_naive(case):
    n, k, dim, dtype, overrides = GPU_CASES[case]
    result = run_case(n, k, dim, dtype, overrides, device="cuda")
    check_case(result, grad_tol=2e-2 if dtype == torch.bfloat16 else 1e-3)
