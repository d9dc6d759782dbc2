"""FLOP accounting for throughput and MFU, in one place.

Training FLOPs per optimizer step = 3 x (forward FLOPs of one micro-batch) x micro-batches per step x world size.
The forward FLOPs are counted once, on the first micro-batch, by `count_forward_flops`:

- `torch.utils.flop_counter.FlopCounterMode` over the whole model: LLM matmuls and attention, projector, and the
  tokenizer's encoder and decoder, so the tokenizer is included exactly as it runs (x3 = forward + backward, the
  usual 1:2 rule; activation recomputation is not counted, as in Megatron's MFU);
- plus the codebook GEMMs of the Triton kernels (modeling/kernels/triton_kernels.py), which the counter cannot see
  (a Triton launch is not an aten op). While counting, the two forward entry points of that module
  (`row_softmax_stats`, `column_prob_sum`) are wrapped and every call adds 2·N·K·D per z·Cᵀ pass, and 2·N·K·D more
  for the soft output S·C. That is exactly what the counter counts for the same call on the chunked torch path
  (modeling/kernels/reference.py), so the count, and MFU, do not depend on the backend. `last_forward_count()`
  also gives the FLOPs the kernels execute in forward + backward (the backward recomputes z·Cᵀ), for reports.

MFU = achieved FLOP/s / peak FLOP/s. The peak is, in this order: `ETT_PEAK_TFLOPS` (TFLOP/s) when set; on CUDA,
a dense bf16 matmul peak measured once per process on this GPU (`measure_matmul_peak`: best of 5 x 10 back-to-back
8192³ matmuls timed with CUDA events, about 0.1 s on an H100); the datasheet value of PEAK_TFLOPS if the
measurement fails; otherwise (CPU without ETT_PEAK_TFLOPS) unknown, and `mfu()` returns None.
"""

from __future__ import annotations

import contextlib
import os

import torch
from torch.utils.flop_counter import FlopCounterMode

PEAK_ENV_VAR = "ETT_PEAK_TFLOPS"

PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L40S": 362.0, "A10G": 125.0}
"""Datasheet dense bf16 peaks (TFLOP/s): only the fallback when the measurement fails (a measured H100/H200
reaches about 80% of its datasheet number on 8192³)."""

MATMUL_PEAK_SIZE = 8192

_PEAK: dict | None = None
_LAST_COUNT: dict | None = None


# ---------------------------------------------------------------------------------------------------------------
# peak


def measure_matmul_peak(
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.bfloat16,
    size: int = MATMUL_PEAK_SIZE,
    iters: int = 10,
    trials: int = 5,
) -> float:
    """Dense matmul FLOP/s of `device` (default: the current CUDA device): the best of `trials` runs of `iters`
    back-to-back size³ matmuls after a warm-up, timed with CUDA events (perf_counter on CPU)."""
    import time

    device = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
    gen = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(size, size, device=device, dtype=dtype, generator=gen)
    b = torch.randn(size, size, device=device, dtype=dtype, generator=gen)
    out = torch.empty(size, size, device=device, dtype=dtype)
    cuda = device.type == "cuda"
    for _ in range(max(2, iters // 2)):  # warm-up: cuBLAS heuristics, clocks
        torch.mm(a, b, out=out)
    best = float("inf")
    for _ in range(trials):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(iters):
                torch.mm(a, b, out=out)
            end.record()
            end.synchronize()
            seconds = start.elapsed_time(end) / 1e3
        else:
            begin = time.perf_counter()
            for _ in range(iters):
                torch.mm(a, b, out=out)
            seconds = time.perf_counter() - begin
        best = min(best, seconds)
    del a, b, out
    return 2.0 * size**3 * iters / best


def _datasheet_tflops(name: str) -> float | None:
    for key, tflops in PEAK_TFLOPS.items():
        if key in name:
            return tflops
    return None


def peak_info(refresh: bool = False) -> dict:
    """The peak MFU is measured against: {"flops_per_second": float | None, "source": "env" | "measured" |
    "datasheet" | None, "device", "dtype", "shape", "error"}. Measured once per process and cached."""
    global _PEAK
    if _PEAK is not None and not refresh:
        return dict(_PEAK)
    info: dict = {"flops_per_second": None, "source": None, "device": None, "dtype": None, "shape": None}
    if os.environ.get(PEAK_ENV_VAR):
        info.update(flops_per_second=float(os.environ[PEAK_ENV_VAR]) * 1e12, source="env")
        info["device"] = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    elif torch.cuda.is_available():
        name = torch.cuda.get_device_name()
        info["device"] = name
        try:
            info.update(
                flops_per_second=measure_matmul_peak("cuda"),
                source="measured",
                dtype="bfloat16",
                shape=[MATMUL_PEAK_SIZE] * 3,
            )
        except (RuntimeError, torch.OutOfMemoryError) as exc:  # e.g. no room next to a full training step
            info["error"] = f"{type(exc).__name__}: {str(exc)[:200]}"
            tflops = _datasheet_tflops(name)
            if tflops is not None:
                info.update(flops_per_second=tflops * 1e12, source="datasheet")
    else:
        info["device"] = "cpu"
    _PEAK = info
    return dict(info)


def peak_flops_per_second() -> float | None:
    """Peak FLOP/s of this device for MFU (see the module docstring), or None when unknown (CPU without
    ETT_PEAK_TFLOPS)."""
    return peak_info()["flops_per_second"]


def mfu(flops_per_step: float, seconds_per_step: float) -> float | None:
    peak = peak_flops_per_second()
    if peak is None or seconds_per_step <= 0:
        return None
    return flops_per_step / seconds_per_step / peak


# ---------------------------------------------------------------------------------------------------------------
# the Triton codebook kernels


def codebook_kernel_flops(
    n: int, k: int, d: int, *, soft_output: bool = False, entropy: bool = False, column_sum: bool = False
) -> dict:
    """FLOPs of one forward call into the Triton codebook kernels, and of the backward it implies.

    `forward`: what the call computes, 2NKD per z·Cᵀ pass and 2NKD for the soft output S·C (the count the chunked
    torch path gets from FlopCounterMode). `forward_executed` / `backward_executed`: the GEMM work the kernels run,
    backward recomputation included. A row pass with `soft_output` is IBQ's straight-through forward, whose
    backward (ibq_backward) runs z·Cᵀ, g·Cᵀ and dl·C per token block and z·Cᵀ, g·Cᵀ and dlᵀ·z per code block:
    12NKD. A row pass with `entropy` starts the entropy loss, whose backward (entropy_backward) runs z·Cᵀ,
    weighted·C and p·C per token block and z·Cᵀ and dlᵀ·z per code block: 10NKD. `column_sum` is the entropy
    loss's second forward pass (sum_n p_nk, one z·Cᵀ); a plain argmax (VQ lookup) has no backward."""
    unit = 2 * n * k * d
    if column_sum:
        return {"forward": unit, "forward_executed": unit, "backward_executed": 0}
    forward = unit * (2 if soft_output else 1)
    backward = 6 * unit if soft_output else 5 * unit if entropy else 0
    return {"forward": forward, "forward_executed": forward, "backward_executed": backward}


@contextlib.contextmanager
def record_codebook_kernels():
    """Within the block, every call to the Triton codebook kernels' forward entry points is recorded (kernel,
    N, K, D, flags and `codebook_kernel_flops`) into the yielded list. No-op without an importable triton."""
    calls: list[dict] = []
    try:
        from modeling.kernels import triton_kernels
    except Exception:  # triton missing or not loadable here: the torch path runs and FlopCounterMode sees it
        yield calls
        return

    real_row, real_col = triton_kernels.row_softmax_stats, triton_kernels.column_prob_sum

    def row_softmax_stats(z, codebook, *args, **kwargs):
        soft, entropy = bool(kwargs.get("soft_output", False)), bool(kwargs.get("entropy", False))
        n, d = z.shape
        calls.append({"kernel": "row_softmax_stats", "N": n, "K": codebook.shape[0], "D": d,
                      "soft_output": soft, "entropy": entropy,
                      **codebook_kernel_flops(n, codebook.shape[0], d, soft_output=soft, entropy=entropy)})  # fmt: skip
        return real_row(z, codebook, *args, **kwargs)

    def column_prob_sum(z, codebook, *args, **kwargs):
        n, d = z.shape
        calls.append({"kernel": "column_prob_sum", "N": n, "K": codebook.shape[0], "D": d,
                      **codebook_kernel_flops(n, codebook.shape[0], d, column_sum=True)})  # fmt: skip
        return real_col(z, codebook, *args, **kwargs)

    triton_kernels.row_softmax_stats, triton_kernels.column_prob_sum = row_softmax_stats, column_prob_sum
    try:
        yield calls
    finally:
        triton_kernels.row_softmax_stats, triton_kernels.column_prob_sum = real_row, real_col


def count_forward_flops(fn, *args, **kwargs) -> tuple[int, object]:
    """Run fn(*args, **kwargs) under the FLOP counter; returns (forward FLOPs, fn's result). The FLOPs are
    FlopCounterMode's total plus the forward FLOPs of the Triton codebook kernels that ran (see the module
    docstring); `last_forward_count()` has the breakdown."""
    global _LAST_COUNT
    counter = FlopCounterMode(display=False)
    with record_codebook_kernels() as calls, counter:
        result = fn(*args, **kwargs)
    torch_flops = int(counter.get_total_flops())
    codebook_forward = sum(c["forward"] for c in calls)
    _LAST_COUNT = {
        "forward_flops": torch_flops + codebook_forward,
        "torch_forward_flops": torch_flops,
        "codebook_forward_flops": codebook_forward,
        "codebook_executed_flops_fwd_bwd": sum(c["forward_executed"] + c["backward_executed"] for c in calls),
        "codebook_calls": calls,
    }
    return torch_flops + codebook_forward, result


def last_forward_count() -> dict | None:
    """Breakdown of the last `count_forward_flops` call in this process: forward_flops (what it returned),
    torch_forward_flops, codebook_forward_flops, codebook_executed_flops_fwd_bwd and the kernel calls."""
    return None if _LAST_COUNT is None else dict(_LAST_COUNT)
