"""Triton codebook kernels against naive fp64 references.

On CPU the kernels run under the Triton interpreter in a child process (TRITON_INTERPRET=1 must be set before
the kernels are decorated, and must not leak into other tests), on shapes that are not multiples of the block
sizes, with and without code splits. The child saves inputs and outputs; this process computes the dense
float64 references and compares. On a GPU the same cases run compiled, at a larger shape. The child also runs
the VQ quantizer with its entropy loss at the paper's code dim D = 256 through the Triton path and the torch
path, and this process compares the two.
"""

import os
import subprocess
import sys

import pytest
import torch

from tests.conftest import REPO_ROOT
from tests.test_kernels import assert_argmax_consistent, naive_entropy_loss, naive_ibq

VQ_CASE = dict(batch=2, height=3, width=5, code_dim=256, codebook_size=150)

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
BIAS_TEMPERATURE = (
    0.1  # with a bias at T = 0.01 these inputs are so sharp that even the fp32 torch path is 5e-2 off
)


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

    # With a per-code bias (VQ passes -||c||^2 / 2), differentiable: logits z.c_k + b_k.
    entropy_bias = bias.clone().requires_grad_(True)
    loss = codebook_entropy_loss(z_leaf, codebook_leaf, BIAS_TEMPERATURE, bias=entropy_bias, backend="triton")
    out["entropy_bias"], out["biased_entropy_loss"] = entropy_bias.detach(), loss.detach()
    out["biased_entropy_grad_z"], out["biased_entropy_grad_codebook"], out["biased_entropy_grad_bias"] = (
        torch.autograd.grad(loss, [z_leaf, codebook_leaf, entropy_bias])
    )
    return {name: tensor.detach().cpu() for name, tensor in out.items()}


def run_vq_quantizer(backend: str) -> dict:
    """VectorQuantizer with the entropy loss at D = 256 on `backend` (ETT_KERNEL_BACKEND): losses and grads."""
    from modeling.tokenizer.config import TokenizerConfig
    from modeling.tokenizer.quantizers import VectorQuantizer

    case = VQ_CASE
    os.environ["ETT_KERNEL_BACKEND"] = backend
    try:
        torch.manual_seed(0)
        config = TokenizerConfig(
            quantizer="vq", code_dim=case["code_dim"], codebook_size=case["codebook_size"]
        )
        assert config.loss.entropy_weight > 0
        quantizer = VectorQuantizer(config)
        with torch.no_grad():  # spread codes, so that the nearest code is clear and both backends agree on it
            quantizer.embedding.weight.normal_(0.0, case["code_dim"] ** -0.5)
        gen = torch.Generator().manual_seed(1)
        shape = (case["batch"], case["code_dim"], case["height"], case["width"])
        z = (torch.randn(shape, generator=gen) * case["code_dim"] ** -0.5).requires_grad_(True)
        out = quantizer(z)
        loss = out.losses["quant"] + out.losses["entropy"]
        grad_z, grad_codebook = torch.autograd.grad(loss, [z, quantizer.embedding.weight])
    finally:
        del os.environ["ETT_KERNEL_BACKEND"]
    return dict(
        indices=out.indices,
        quant=out.losses["quant"].detach(),
        entropy=out.losses["entropy"].detach(),
        grad_z=grad_z,
        grad_codebook=grad_codebook,
    )


def run_interpreter_cases(path: str) -> None:
    """Child-process entry point (TRITON_INTERPRET=1): run every interpreter case and torch.save the results."""
    results = {name: run_case(*case, device="cpu") for name, case in INTERPRETER_CASES.items()}
    results["vq-quantizer-d256"] = {backend: run_vq_quantizer(backend) for backend in ("triton", "torch")}
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

    bias64 = result["entropy_bias"].double().requires_grad_(True)
    ref_loss = naive_entropy_loss(z64, codebook64, BIAS_TEMPERATURE, bias64)
    ref_grads = torch.autograd.grad(ref_loss, [z64, codebook64, bias64])
    assert abs(result["biased_entropy_loss"].item() - ref_loss.item()) <= 1e-4 * max(
        1.0, abs(ref_loss.item())
    )
    for name, ref_grad in zip(("z", "codebook", "bias"), ref_grads):
        assert_close_relative(
            result[f"biased_entropy_grad_{name}"], ref_grad, grad_tol, f"biased entropy d{name}"
        )


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


def test_vq_quantizer_entropy_at_d256_triton_matches_torch(interpreter_results):
    """VQ + entropy loss at the paper's D = 256 runs on the Triton path (no appended bias column, which made
    D = 257 > MAX_DIM) and matches the torch path: same codes, losses and gradients."""
    result = interpreter_results["vq-quantizer-d256"]
    triton_out, torch_out = result["triton"], result["torch"]
    assert torch.equal(triton_out["indices"], torch_out["indices"])
    for name in ("quant", "entropy"):
        torch.testing.assert_close(triton_out[name], torch_out[name], rtol=1e-4, atol=1e-5)
    for name in ("grad_z", "grad_codebook"):
        assert torch.isfinite(triton_out[name]).all() and triton_out[name].abs().max() > 0
        assert_close_relative(triton_out[name], torch_out[name].double(), 1e-3, f"VQ {name}")


@pytest.mark.gpu
@pytest.mark.parametrize("case", list(GPU_CASES))
def test_triton_gpu_matches_naive(case):
    n, k, dim, dtype, overrides = GPU_CASES[case]
    result = run_case(n, k, dim, dtype, overrides, device="cuda")
    check_case(result, grad_tol=2e-2 if dtype == torch.bfloat16 else 1e-3)
