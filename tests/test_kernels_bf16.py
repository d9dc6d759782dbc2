"""The entropy loss's dz with bf16 dot operands, as on the GPU, checked on CPU against float64.

On CUDA with bf16 inputs, `_row_grad_kernel` (modeling/kernels/triton_kernels.py) rounds each tl.dot operand to
bf16 and accumulates in fp32. At the entropy temperature T = 0.01 the soft distributions are sharp, so how dz is
split into dot operands decides its error: the kernel's earlier form dz = coef (A - (H + E) O), with
A = sum_k p (log q - log p) c and O = sum_k p c, rounds operands of size ~|log q| whose two products then cancel,
and misses tests/test_gpu.py's 2e-2 tolerance (errors 6e-2 to 1.2e-1 on the cases below, up to 1e0 on others);
the per-element weights dl = coef p (log q - log p - H - E) of the current kernel do not cancel (1e-3 to 2e-3). Two checks, at D = 256 and K of a few thousand codes:

- `emulate_entropy_dz` follows the kernel's tile arithmetic in torch, with a bf16 round trip exactly where the
  kernel rounds a dot operand (fast, in process); `emulate_entropy_dz_replaced` does the same for the earlier
  form, to show that these cases are sharp enough to tell the two apart.
- The kernels themselves run under TRITON_INTERPRET=1 in a child process. There `_dot_operand` rounds every dot
  operand of bf16 inputs to bf16 (ties to even) as the GPU does, so their dz must meet the tolerance too, and
  must agree with the emulation: a kernel that went back to rounding large operands fails both.

Both compare with the dense float64 gradient of the loss on the same (bf16-valued) inputs.
"""

import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from modeling.kernels import reference
from tests.conftest import REPO_ROOT

TEMPERATURE = 0.01
TOL = 2e-2  # tests/test_gpu.py: entropy dz and dC, max error relative to the largest magnitude
DIM = 256
BLOCK_K = 64  # the kernels' default TritonConfig.block_k: the emulation sums over codes in the same tiles

CASES = {
    # name: (N, K, kind, seed). "ibq": z and C ~ N(0, 1) D^-1/4, the logits z.c ~ N(0, 1) as in tests/test_gpu.py;
    # "vq": z and C unit-normalised as VectorQuantizer(vq_l2_normalize=True) does, with its bias -||c||^2 / 2.
    "ibq-64x2048": (64, 2048, "ibq", 0),
    "ibq-64x4096": (64, 4096, "ibq", 0),
    "vq-64x4096": (64, 4096, "vq", 0),
}


def bf16_round(x: torch.Tensor) -> torch.Tensor:
    """x rounded to bf16 (ties to even) and back to fp32: what the kernel's cast of a dot operand does."""
    return x.to(torch.bfloat16).float()


def make_case(n, k, kind, seed):
    """bf16 z [N, D], codebook [K, D] and the fp32 bias [K] (None for IBQ)."""
    gen = torch.Generator().manual_seed(seed)
    z = torch.randn(n, DIM, generator=gen)
    codebook = torch.randn(k, DIM, generator=gen)
    if kind == "ibq":
        z, codebook = z * DIM**-0.25, codebook * DIM**-0.25
    else:
        z, codebook = F.normalize(z, dim=-1), F.normalize(codebook, dim=-1)
    z, codebook = z.to(torch.bfloat16), codebook.to(torch.bfloat16)
    bias = -0.5 * codebook.float().pow(2).sum(-1) if kind == "vq" else None
    return z, codebook, bias


def forward_stats(z, codebook, bias):
    """lse, row entropy H and log q (fp32) as CodebookEntropyLoss computes them before the backward kernels."""
    scale = 1.0 / TEMPERATURE
    stats = reference.row_softmax_stats(z, codebook, bias, scale, entropy=True)
    avg_probs = reference.column_prob_sum(z, codebook, stats.lse, scale, bias=bias) / z.shape[0]
    log_avg = torch.log(avg_probs.clamp_min(torch.finfo(torch.float32).tiny))
    return stats.lse, stats.entropy, log_avg


def _tiles(z, codebook, bias, lse, block_k):
    """Per code tile: (bf16-valued fp32 codes, log p, p), as `_row_grad_kernel` recomputes them (fp32)."""
    z32 = bf16_round(z.float())  # `z = _dot_operand(z, ...)`: exact for bf16 z
    for k0 in range(0, codebook.shape[0], block_k):
        c = bf16_round(codebook[k0 : k0 + block_k].float())  # `c = _dot_operand(c, ...)`
        logits = z32 @ c.T  # `_scaled_logits`: fp32 dot of bf16 operands (exact products), then + b, * scale
        if bias is not None:
            logits = logits + bias[k0 : k0 + block_k].float()
        log_probs = logits * (1.0 / TEMPERATURE) - lse[:, None]
        yield k0, c, log_probs, torch.exp(log_probs)


def emulate_entropy_dz(z, codebook, bias, lse, row_entropy, log_avg, block_k=BLOCK_K):
    """dz of `_row_grad_kernel`, MODE == 1 (modeling/kernels/triton_kernels.py), with its bf16 operand rounding.

    Mirrors (triton_kernels.py, `_row_grad_kernel`, about lines 245-290): the first sweep `cross += tl.sum(probs * log_avg[None, :], axis=1)` and
    `offset = row_entropy + cross`; then, per tile of the second sweep,
    `dlogits = coef * probs * (log_avg[None, :] - log_probs - offset[:, None])` and
    `acc += tl.dot(_dot_operand(dlogits, ...), c)`, the one rounded operand being dlogits.
    """
    coef = (1.0 / TEMPERATURE) / z.shape[0]
    cross = torch.zeros(z.shape[0])
    for k0, _, _, probs in _tiles(z, codebook, bias, lse, block_k):
        cross += (probs * log_avg[None, k0 : k0 + block_k]).sum(dim=1)
    offset = row_entropy + cross
    acc = torch.zeros(z.shape[0], z.shape[1])
    for k0, c, log_probs, probs in _tiles(z, codebook, bias, lse, block_k):
        dlogits = coef * probs * (log_avg[None, k0 : k0 + block_k] - log_probs - offset[:, None])
        acc += bf16_round(dlogits) @ c
    return acc


def emulate_entropy_dz_replaced(z, codebook, bias, lse, row_entropy, log_avg, block_k=BLOCK_K):
    """dz of the form `_row_grad_kernel` used before (commit 6eca3c6, triton_kernels.py:226-234), one sweep:
    `weighted = probs * (log_avg - log_probs)`, `acc += tl.dot(weighted.to(bf16), c)`,
    `acc_out += tl.dot(probs.to(bf16), c)`, `cross += tl.sum(probs * log_avg)`, and at the end
    `acc = coef * (acc - (row_entropy + cross)[:, None] * acc_out)`."""
    coef = (1.0 / TEMPERATURE) / z.shape[0]
    acc = torch.zeros(z.shape[0], z.shape[1])
    acc_out = torch.zeros_like(acc)
    cross = torch.zeros(z.shape[0])
    for k0, c, log_probs, probs in _tiles(z, codebook, bias, lse, block_k):
        log_avg_tile = log_avg[None, k0 : k0 + block_k]
        acc += bf16_round(probs * (log_avg_tile - log_probs)) @ c
        acc_out += bf16_round(probs) @ c
        cross += (probs * log_avg_tile).sum(dim=1)
    return coef * (acc - (row_entropy + cross)[:, None] * acc_out)


def float64_grads(z, codebook, bias):
    """Dense float64 (dz, dC, db) of mean_n H(p_n) - H(mean_n p_n), p = softmax((z C^T + b) / T)."""
    z64 = z.double().requires_grad_(True)
    c64 = codebook.double().requires_grad_(True)
    b64 = (bias if bias is not None else torch.zeros(codebook.shape[0])).double().requires_grad_(True)
    logits = (z64 @ c64.T + b64) / TEMPERATURE
    probs = torch.softmax(logits, dim=1)
    avg = probs.mean(dim=0)
    loss = (
        -(probs * torch.log_softmax(logits, dim=1)).sum(dim=1).mean()
        + (avg * avg.clamp_min(1e-300).log()).sum()
    )
    return torch.autograd.grad(loss, [z64, c64, b64])


def relative_error(actual, expected) -> float:
    """Max |actual - expected| over the largest |expected|, as tests/test_gpu.py measures it."""
    return ((actual.double() - expected).abs().max() / expected.abs().max().clamp_min(1e-300)).item()


@pytest.mark.parametrize("case", list(CASES))
def test_emulated_bf16_entropy_dz_meets_gpu_tolerance(case):
    z, codebook, bias = make_case(*CASES[case])
    lse, row_entropy, log_avg = forward_stats(z, codebook, bias)
    expected = float64_grads(z, codebook, bias)[0]
    error = relative_error(emulate_entropy_dz(z, codebook, bias, lse, row_entropy, log_avg), expected)
    replaced = relative_error(
        emulate_entropy_dz_replaced(z, codebook, bias, lse, row_entropy, log_avg), expected
    )
    assert error <= TOL, f"{case}: emulated bf16 dz error {error:.3g} > {TOL} (replaced form: {replaced:.3g})"
    # The case is sharp enough to matter: the replaced operand order misses the tolerance on it.
    assert replaced > TOL, f"{case}: replaced form's error {replaced:.3g} <= {TOL}; the case does not cancel"


def run_interpreter_cases(path: str) -> None:
    """Child-process entry point (TRITON_INTERPRET=1): the Triton entropy kernels on bf16 inputs, torch.save'd."""
    from dataclasses import replace

    from modeling.kernels import triton_kernels

    torch.set_num_threads(1)
    triton_kernels.CONFIG = replace(triton_kernels.CONFIG, block_n=64, block_k=BLOCK_K, num_splits=1)
    scale = 1.0 / TEMPERATURE
    results = {}
    for name, case in CASES.items():
        z, codebook, bias = make_case(*case)
        stats = triton_kernels.row_softmax_stats(z, codebook, bias, scale, entropy=True)
        avg_probs = triton_kernels.column_prob_sum(z, codebook, stats.lse, scale, bias=bias) / z.shape[0]
        log_avg = torch.log(avg_probs.clamp_min(torch.finfo(torch.float32).tiny))
        grads = triton_kernels.entropy_backward(
            z, codebook, stats.lse, stats.entropy, log_avg, scale, bias=bias
        )
        results[name] = dict(lse=stats.lse, entropy=stats.entropy, log_avg=log_avg, grads=grads)
    torch.save(results, path)


@pytest.fixture(scope="module")
def interpreter_results(tmp_path_factory):
    pytest.importorskip("triton")
    path = tmp_path_factory.mktemp("triton_bf16") / "results.pt"
    env = dict(os.environ, TRITON_INTERPRET="1", OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = REPO_ROOT + os.pathsep + env.get("PYTHONPATH", "")
    code = f"from tests.test_kernels_bf16 import run_interpreter_cases; run_interpreter_cases({str(path)!r})"
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return torch.load(path)


@pytest.mark.parametrize("case", list(CASES))
def test_interpreted_kernels_with_bf16_operands_meet_gpu_tolerance(interpreter_results, case):
    z, codebook, bias = make_case(*CASES[case])
    result = interpreter_results[case]
    grad_z, grad_codebook, grad_bias = result["grads"]
    expected = float64_grads(z, codebook, bias)
    for what, actual, ref in (("dz", grad_z, expected[0]), ("dC", grad_codebook, expected[1])):
        error = relative_error(actual, ref)
        assert error <= TOL, f"{case}: interpreted kernel {what} error {error:.3g} > {TOL}"
    if bias is not None:
        error = relative_error(grad_bias, expected[2])
        assert error <= TOL, f"{case}: interpreted kernel db error {error:.3g} > {TOL}"
    # The emulation, fed the kernel's own forward statistics, reproduces the kernel's dz.
    emulated = emulate_entropy_dz(z, codebook, bias, result["lse"], result["entropy"], result["log_avg"])
    agreement = relative_error(grad_z, emulated.double())
    assert agreement <= TOL / 4, f"{case}: kernel and emulation differ by {agreement:.3g}"
