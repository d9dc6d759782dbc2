"""Codebook lookup benchmark: naive (materialised N x K) vs chunked torch vs Triton, forward and forward+backward.

    python -m benchmarks.codebook_lookup [--shapes small|paper] [--json OUT]

Forward: index = argmax_k z.c_k (IBQ) by `torch.cdist` + argmin (fp32), by a materialised matmul + argmax in the
input dtype, by the chunked torch path and by the Triton kernel (CUDA only). Forward+backward: IBQ's
straight-through z_q = (H - sg(S) + S) C written densely as in the IBQ code, vs `ibq_straight_through`.
Memory: on CUDA the peak extra allocated bytes; on CPU the largest single allocation (the chunked path's bound
is on its temporaries). The budget check runs the chunked forward in a child process at a shape whose N x K
fp32 logits need more than 4 GB, and reports its peak RSS growth next to the naive path's computed need.
"""

import argparse
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import time

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from modeling.kernels import codebook_argmax, ibq_straight_through, reference

SHAPES = {
    "small": [(512, 2048, 64), (1024, 8192, 64)],
    "paper": [(16384, 131072, 256), (65536, 131072, 256)],
}
BUDGET_CHECK_SHAPE = (4096, 262144, 32)


class LargestAllocation(TorchDispatchMode):
    """Largest storage produced by any aten op (CPU memory proxy)."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(tensor, torch.Tensor):
                self.largest = max(self.largest, tensor.untyped_storage().nbytes())
        return out


def naive_cdist_argmin(z, codebook):
    return torch.cdist(z.float(), codebook.float()).argmin(dim=1)


def naive_matmul_argmax(z, codebook):
    return (z @ codebook.T).argmax(dim=1)


def naive_ibq(z, codebook):
    soft = torch.softmax((z @ codebook.T).float(), dim=1)
    hard = torch.nn.functional.one_hot(soft.argmax(dim=1), codebook.shape[0]).to(soft.dtype)
    return ((hard - soft.detach() + soft) @ codebook.float()).to(z.dtype)


def forward_methods(device):
    methods = {
        "naive cdist+argmin": naive_cdist_argmin,
        "naive matmul+argmax": naive_matmul_argmax,
        "chunked torch": lambda z, c: codebook_argmax(z, c, backend="torch"),
    }
    if device.type == "cuda":
        methods["triton"] = lambda z, c: codebook_argmax(z, c, backend="triton")
    return methods


def train_methods(device):
    def step(fn):
        def run(z, codebook):
            z_q = fn(z, codebook)
            z_q = z_q[0] if isinstance(z_q, tuple) else z_q
            z_q.backward(torch.ones_like(z_q))

        return run

    methods = {
        "naive IBQ": step(naive_ibq),
        "chunked torch": step(lambda z, c: ibq_straight_through(z, c, backend="torch")),
    }
    if device.type == "cuda":
        methods["triton"] = step(lambda z, c: ibq_straight_through(z, c, backend="triton"))
    return methods


def measure(fn, z, codebook, device, repeats):
    """(median seconds, peak extra bytes or largest allocation), or an 'OOM' marker."""
    try:
        fn(z, codebook)
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            times = []
            for _ in range(repeats):
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn(z, codebook)
                end.record()
                torch.cuda.synchronize()
                times.append(start.elapsed_time(end) / 1e3)
            return statistics.median(times), torch.cuda.max_memory_allocated() - base
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            fn(z, codebook)
            times.append(time.perf_counter() - start)
        with LargestAllocation() as tracker:
            fn(z, codebook)
        return statistics.median(times), tracker.largest
    except torch.OutOfMemoryError:
        if device.type == "cuda":
            torch.cuda.empty_cache()
        return None, None


def matmul_tflops(device, dtype):
    """Measured dense matmul throughput (TFLOP/s) of this device at 8192^3 (4096^3 on CPU)."""
    size = 8192 if device.type == "cuda" else 1024
    a = torch.randn(size, size, device=device, dtype=dtype)
    seconds, _ = measure(lambda x, y: x @ y, a, a, device, repeats=10 if device.type == "cuda" else 3)
    return 2 * size**3 / seconds / 1e12


def budget_check_child(n, k, dim):
    """Child process: peak RSS growth of the chunked forward at a shape whose logits exceed 4 GB."""
    z = torch.randn(n, dim)
    codebook = torch.randn(k, dim)
    codebook_argmax(z[:8], codebook[:64], backend="torch")
    with open("/proc/self/statm") as f:
        rss_before = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    start = time.perf_counter()
    codebook_argmax(z, codebook, backend="torch")
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"seconds": seconds, "peak_rss_growth_bytes": peak - rss_before}))


def run_budget_check():
    n, k, dim = BUDGET_CHECK_SHAPE
    code = f"from benchmarks.codebook_lookup import budget_check_child; budget_check_child({n}, {k}, {dim})"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    child = json.loads(proc.stdout.strip().splitlines()[-1])
    return {
        "shape": [n, k, dim],
        "naive_logits_bytes_fp32": n * k * 4,
        "budget_bytes": reference.MEMORY_BUDGET_BYTES,
        "inputs_bytes": (n + k) * dim * 4,
        **child,
    }


def main(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--shapes", choices=sorted(SHAPES), default="small")
    parser.add_argument("--json", dest="json_out", default=None, help="write results to this JSON file")
    parser.add_argument(
        "--repeats", type=int, default=None, help="timed repetitions (default 20 CUDA, 3 CPU)"
    )
    parser.add_argument("--skip-budget-check", action="store_true")
    args = parser.parse_args(argv)

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    repeats = args.repeats or (20 if device.type == "cuda" else 3)
    device_name = torch.cuda.get_device_name() if device.type == "cuda" else f"CPU ({os.cpu_count()} cores)"
    peak = matmul_tflops(device, dtype)
    print(f"device: {device_name}  dtype: {dtype}  measured matmul: {peak:.2f} TFLOP/s")
    rows = []
    header = f"{'N':>7} {'K':>7} {'D':>4} {'pass':<8} {'method':<22} {'ms':>10} {'MB':>10} {'TFLOP/s':>8} {'%peak':>6}"
    print(header)
    for n, k, dim in SHAPES[args.shapes]:
        gen = torch.Generator().manual_seed(0)
        z = torch.randn(n, dim, generator=gen).to(device=device, dtype=dtype)
        codebook = torch.randn(k, dim, generator=gen).to(device=device, dtype=dtype)
        for pass_name, methods, flops in (
            ("fwd", forward_methods(device), 2 * n * k * dim),
            ("fwd+bwd", train_methods(device), 12 * n * k * dim),
        ):
            for method, fn in methods.items():
                zz, cc = z, codebook
                if pass_name == "fwd+bwd":
                    zz, cc = z.clone().requires_grad_(True), codebook.clone().requires_grad_(True)
                seconds, mem = measure(fn, zz, cc, device, repeats)
                tflops = flops / seconds / 1e12 if seconds else None
                row = dict(N=n, K=k, D=dim, dtype=str(dtype), pass_=pass_name, method=method, seconds=seconds,
                           memory_bytes=mem, tflops=tflops, fraction_of_matmul_peak=tflops / peak if tflops else None)  # fmt: skip
                rows.append(row)
                ms = f"{seconds * 1e3:10.2f}" if seconds else f"{'OOM':>10}"
                mb = f"{mem / 2**20:10.1f}" if mem is not None else f"{'-':>10}"
                tf = f"{tflops:8.3f} {100 * tflops / peak:5.1f}%" if tflops else f"{'-':>8} {'-':>6}"
                print(f"{n:>7} {k:>7} {dim:>4} {pass_name:<8} {method:<22} {ms} {mb} {tf}")
            del zz, cc
    budget = None
    if not args.skip_budget_check:
        budget = run_budget_check()
        print(
            f"budget check {tuple(budget['shape'])}: naive fp32 logits need {budget['naive_logits_bytes_fp32'] / 2**30:.2f} GiB; "
            f"chunked forward took {budget['seconds']:.1f} s with peak RSS growth "
            f"{budget['peak_rss_growth_bytes'] / 2**20:.0f} MiB (budget {budget['budget_bytes'] / 2**20:.0f} MiB "
            f"+ inputs {budget['inputs_bytes'] / 2**20:.0f} MiB)"
        )
    if args.json_out:
        result = dict(device=device_name, dtype=str(dtype), matmul_tflops=peak, rows=rows, budget_check=budget,
                      flops_convention="fwd 2NKD (argmax GEMM), fwd+bwd 12NKD", torch=torch.__version__)  # fmt: skip
        with open(args.json_out, "w") as f:
            json.dump(result, f, indent=2)
    return 0 if math.isfinite(peak) else 1


if __name__ == "__main__":
    sys.exit(main())
