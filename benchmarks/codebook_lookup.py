"""Codebook lookup benchmark: naive (materialised N x K) vs chunked torch vs chunked matmul vs Triton, forward and
forward+backward.

    python -m benchmarks.codebook_lookup [--shapes smoke|small|paper] [--repeats R] [--json OUT]

Forward: index = argmax_k z.c_k (IBQ) by `torch.cdist` + argmin (fp32), by a materialised matmul + argmax in the
input dtype, by the chunked torch path (modeling/kernels/reference.py, fp32 arithmetic), by a chunked matmul in
the input dtype (bf16 cuBLAS GEMMs with fp32 accumulation on CUDA, a few thousand rows of logits at a time: the
Liger-style competitor) and by the Triton kernel (CUDA, or any device under TRITON_INTERPRET=1). Forward+backward:
IBQ's straight-through z_q = (H - sg(S) + S) C written densely as in the IBQ code, the chunked matmul version of
it (forward saves lse and S·C; backward recomputes each chunk's logits), and `ibq_straight_through`.

Each row reports the credited FLOPs (fwd 2NKD, fwd+bwd 12NKD, the same for every method, so TFLOP/s compare
methods) and the FLOPs the method executes (recomputation included, e.g. 16NKD for the Triton fwd+bwd), both
against the dense matmul peak measured in the same run (bf16 8192³ on CUDA, training.flops.measure_matmul_peak).
On CUDA the registers, spills, shared memory and warps of every compiled Triton kernel are listed.
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
    "smoke": [(64, 256, 32)],
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


CHUNK_BYTES = {"cuda": 2 * 2**30, "cpu": 256 * 2**20}
"""fp32 bytes of one chunk's logits in the chunked matmul path (4,096 rows at K = 131,072 on CUDA)."""


def _chunk_rows(z, codebook) -> int:
    budget = CHUNK_BYTES["cuda" if z.is_cuda else "cpu"]
    return max(1, min(z.shape[0], budget // (4 * codebook.shape[0])))


def chunked_matmul_argmax(z, codebook):
    """argmax and fp32 log-sum-exp, a chunk of rows at a time, with GEMMs in the input dtype."""
    rows = _chunk_rows(z, codebook)
    indices, lse = [], []
    for start in range(0, z.shape[0], rows):
        logits = z[start : start + rows] @ codebook.T
        indices.append(logits.argmax(dim=1))
        lse.append(torch.logsumexp(logits.float(), dim=1))
    return torch.cat(indices), torch.cat(lse)


class ChunkedMatmulIBQ(torch.autograd.Function):
    """IBQ straight-through with chunked GEMMs in the input dtype: the forward keeps lse, the indices and S·C;
    the backward recomputes each chunk's logits (z·Cᵀ), then g·Cᵀ, dz = dl·C and dC += dlᵀ·z."""

    @staticmethod
    def forward(ctx, z, codebook):
        rows = _chunk_rows(z, codebook)
        indices, lse, soft = [], [], []
        for start in range(0, z.shape[0], rows):
            logits = (z[start : start + rows] @ codebook.T).float()
            indices.append(logits.argmax(dim=1))
            row_lse = torch.logsumexp(logits, dim=1)
            lse.append(row_lse)
            probs = torch.exp(logits.sub_(row_lse[:, None])).to(z.dtype)
            soft.append(probs @ codebook)
            del logits, probs
        indices, lse, soft = torch.cat(indices), torch.cat(lse), torch.cat(soft)
        ctx.rows = rows
        ctx.save_for_backward(z, codebook, indices, lse, soft)
        ctx.mark_non_differentiable(indices)
        return codebook[indices], indices

    @staticmethod
    def backward(ctx, grad_zq, _grad_indices):
        z, codebook, indices, lse, soft = ctx.saved_tensors
        grad_zq = grad_zq.to(z.dtype)
        grad_z = torch.empty_like(z)
        grad_codebook = torch.zeros(codebook.shape, dtype=torch.float32, device=z.device)
        for start in range(0, z.shape[0], ctx.rows):
            stop = start + ctx.rows
            z_chunk, g_chunk = z[start:stop], grad_zq[start:stop]
            probs = torch.exp((z_chunk @ codebook.T).float().sub_(lse[start:stop, None]))
            delta = (g_chunk.float() * soft[start:stop].float()).sum(dim=1)
            dlogits = (probs.mul_((g_chunk @ codebook.T).float().sub_(delta[:, None]))).to(z.dtype)
            grad_z[start:stop] = dlogits @ codebook
            grad_codebook += (dlogits.T @ z_chunk).float()
            del probs, dlogits
        grad_codebook.index_add_(0, indices, grad_zq.float())
        return grad_z, grad_codebook.to(codebook.dtype)


def chunked_matmul_ibq(z, codebook):
    return ChunkedMatmulIBQ.apply(z, codebook)


def triton_available(device) -> bool:
    """Triton runs on CUDA tensors, and on CPU tensors under TRITON_INTERPRET=1 (tiny shapes only: slow)."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return device.type == "cuda" or os.environ.get("TRITON_INTERPRET", "0") == "1"


CHUNKED_MATMUL = "chunked matmul (input dtype)"

# FLOPs each method executes, in units of N*K*D (GEMMs only; cdist's mm path included).
EXECUTED_NKD = {
    "fwd": {
        "naive cdist+argmin": 2,
        "naive matmul+argmax": 2,
        "chunked torch": 2,
        CHUNKED_MATMUL: 2,
        "triton": 2,
    },
    # naive: z·Cᵀ, Ind·C forward; g·Cᵀ, Indᵀ·g, dl·C, dlᵀ·z backward. Chunked: z·Cᵀ, S·C forward; z·Cᵀ again,
    # g·Cᵀ, dl·C, dlᵀ·z backward. Triton: z·Cᵀ, S·C forward; z·Cᵀ, g·Cᵀ, dl·C (dz kernel) and z·Cᵀ, g·Cᵀ, dlᵀ·z
    # (dC kernel) backward.
    "fwd+bwd": {"naive IBQ": 12, "chunked torch": 12, CHUNKED_MATMUL: 12, "triton": 16},
}
CREDITED_NKD = {"fwd": 2, "fwd+bwd": 12}


def forward_methods(device):
    methods = {
        "naive cdist+argmin": naive_cdist_argmin,
        "naive matmul+argmax": naive_matmul_argmax,
        "chunked torch": lambda z, c: codebook_argmax(z, c, backend="torch"),
        CHUNKED_MATMUL: chunked_matmul_argmax,
    }
    if triton_available(device):
        methods["triton"] = lambda z, c: codebook_argmax(z, c, backend="triton")
    return methods


def triton_kernel_resources() -> dict:
    """Registers, spills, shared memory and launch settings of every Triton codebook kernel compiled so far in
    this process ({"kernels": [...], "note": ...}). Reads the JIT caches: `JITFunction.device_caches` (Triton 3.x,
    first tuple entry = {key: CompiledKernel}) or `JITFunction.cache` ({device: {key: CompiledKernel}}, older)."""
    try:
        from modeling.kernels import triton_kernels
    except Exception as exc:
        return {"kernels": [], "note": f"triton kernels not importable: {type(exc).__name__}: {exc}"}
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        return {"kernels": [], "note": "TRITON_INTERPRET=1: kernels are interpreted, nothing is compiled"}
    names = (
        "MODE",
        "HAS_BIAS",
        "ENTROPY",
        "SOFT_OUTPUT",
        "BLOCK_N",
        "BLOCK_K",
        "BLOCK_D",
        "DOT_DTYPE",
        "ROUND_BF16",
    )
    kernels = []
    for fn_name in ("_row_stats_kernel", "_row_grad_kernel", "_col_grad_kernel"):
        fn = getattr(triton_kernels, fn_name, None)
        caches = getattr(fn, "device_caches", None)
        if caches is not None:
            tables = [entry[0] if isinstance(entry, (tuple, list)) else entry for entry in caches.values()]
        else:
            tables = list(getattr(fn, "cache", {}).values())
        for table in tables:
            for compiled in list(table.values()):
                row = {"kernel": fn_name}
                try:
                    compiled._init_handles()
                except Exception as exc:  # e.g. out of shared memory: report, do not fail the benchmark
                    row["error"] = f"{type(exc).__name__}: {exc}"
                meta = getattr(compiled, "metadata", None)
                row.update(n_regs=getattr(compiled, "n_regs", None), n_spills=getattr(compiled, "n_spills", None),
                           shared_bytes=getattr(meta, "shared", None), num_warps=getattr(meta, "num_warps", None),
                           num_stages=getattr(meta, "num_stages", None))  # fmt: skip
                try:
                    arg_names = list(fn.arg_names)
                    constants = {}
                    for key, value in getattr(compiled.src, "constants", {}).items():
                        key = key[0] if isinstance(key, tuple) and len(key) == 1 else key
                        name = arg_names[key] if isinstance(key, int) else key
                        if name in names:
                            constants[name] = value if isinstance(value, (int, float, bool)) else str(value)
                    row["constants"] = constants
                except Exception as exc:
                    row["constants_error"] = f"{type(exc).__name__}: {exc}"
                kernels.append(row)
    note = None if kernels else "no compiled kernel found in the JIT caches"
    return {"kernels": kernels, "note": note}


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
        CHUNKED_MATMUL: step(chunked_matmul_ibq),
    }
    if triton_available(device):
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


def matmul_tflops(device, dtype, size=None):
    """Measured dense matmul throughput (TFLOP/s) of this device: 8192^3 on CUDA (the peak MFU uses,
    training.flops.measure_matmul_peak), 1024^3 on CPU."""
    from training.flops import MATMUL_PEAK_SIZE, measure_matmul_peak

    size = size or (MATMUL_PEAK_SIZE if device.type == "cuda" else 1024)
    iters, trials = (10, 5) if device.type == "cuda" else (2, 2)
    return measure_matmul_peak(device, dtype, size=size, iters=iters, trials=trials) / 1e12


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
    parser.add_argument(
        "--methods", nargs="*", default=None, help="only these methods (names as printed), e.g. triton"
    )
    args = parser.parse_args(argv)

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    repeats = args.repeats or (20 if device.type == "cuda" else 3)
    device_name = torch.cuda.get_device_name() if device.type == "cuda" else f"CPU ({os.cpu_count()} cores)"
    peak = matmul_tflops(device, dtype)
    print(f"device: {device_name}  dtype: {dtype}  measured matmul: {peak:.2f} TFLOP/s", flush=True)
    result = dict(device=device_name, dtype=str(dtype), matmul_tflops=peak,
                  matmul_peak_shape=[8192] * 3 if device.type == "cuda" else None, rows=[], budget_check=None,
                  flops_convention="credited: fwd 2NKD (argmax GEMM), fwd+bwd 12NKD; executed: the GEMMs each "
                  "method runs (EXECUTED_NKD), recomputation included", executed_nkd=EXECUTED_NKD,
                  shapes=args.shapes, repeats=repeats, torch=torch.__version__,
                  triton_interpret=os.environ.get("TRITON_INTERPRET", "0") == "1")  # fmt: skip
    try:
        import triton

        result["triton"] = triton.__version__
    except ImportError:
        result["triton"] = None

    def write():
        if args.json_out:
            result["triton_kernels"] = triton_kernel_resources() if "triton" in used else None
            with open(args.json_out, "w") as f:
                json.dump(result, f, indent=2)

    used: set[str] = set()
    header = (f"{'N':>7} {'K':>7} {'D':>4} {'pass':<8} {'method':<28} {'ms':>10} {'MB':>10} {'TFLOP/s':>8} "
              f"{'%peak':>6} {'exec%':>6}")  # fmt: skip
    print(header, flush=True)
    for n, k, dim in SHAPES[args.shapes]:
        gen = torch.Generator().manual_seed(0)
        z = torch.randn(n, dim, generator=gen).to(device=device, dtype=dtype)
        codebook = torch.randn(k, dim, generator=gen).to(device=device, dtype=dtype)
        for pass_name, methods in (("fwd", forward_methods(device)), ("fwd+bwd", train_methods(device))):
            for method, fn in methods.items():
                if args.methods is not None and method not in args.methods:
                    continue
                used.add(method)
                zz, cc = z, codebook
                if pass_name == "fwd+bwd":
                    zz, cc = z.clone().requires_grad_(True), codebook.clone().requires_grad_(True)
                error = None
                try:
                    seconds, mem = measure(fn, zz, cc, device, repeats)
                except Exception as exc:  # one method failing (e.g. a kernel out of resources) is reported
                    seconds, mem, error = None, None, f"{type(exc).__name__}: {str(exc)[:300]}"
                if device.type == "cuda":
                    torch.cuda.empty_cache()
                flops = CREDITED_NKD[pass_name] * n * k * dim
                executed = EXECUTED_NKD[pass_name][method] * n * k * dim
                tflops = flops / seconds / 1e12 if seconds else None
                executed_tflops = executed / seconds / 1e12 if seconds else None
                row = dict(N=n, K=k, D=dim, dtype=str(dtype), pass_=pass_name, method=method, seconds=seconds,
                           memory_bytes=mem, flops=flops, tflops=tflops,
                           fraction_of_matmul_peak=tflops / peak if tflops else None, executed_flops=executed,
                           executed_tflops=executed_tflops,
                           executed_fraction_of_matmul_peak=executed_tflops / peak if executed_tflops else None,
                           error=error, status="ok" if seconds else ("error" if error else "OOM"))  # fmt: skip
                result["rows"].append(row)
                ms = f"{seconds * 1e3:10.2f}" if seconds else f"{'ERROR' if error else 'OOM':>10}"
                mb = f"{mem / 2**20:10.1f}" if mem is not None else f"{'-':>10}"
                tf = (f"{tflops:8.3f} {100 * tflops / peak:5.1f}% {100 * executed_tflops / peak:5.1f}%" if tflops
                      else f"{'-':>8} {'-':>6} {'-':>6}")  # fmt: skip
                print(f"{n:>7} {k:>7} {dim:>4} {pass_name:<8} {method:<28} {ms} {mb} {tf}", flush=True)
                if error:
                    print(f"    {method}: {error}", flush=True)
                del zz, cc
                write()
    if "triton" in used:
        resources = triton_kernel_resources()
        for kernel in resources["kernels"]:
            print(f"triton {kernel['kernel']} {kernel.get('constants', {})}: {kernel.get('n_regs')} registers, "
                  f"{kernel.get('n_spills')} spills, {kernel.get('shared_bytes')} B shared, "
                  f"{kernel.get('num_warps')} warps, {kernel.get('num_stages')} stages", flush=True)  # fmt: skip
        if resources.get("note"):
            print(f"triton kernels: {resources['note']}", flush=True)
    if not args.skip_budget_check:
        budget = run_budget_check()
        result["budget_check"] = budget
        print(
            f"budget check {tuple(budget['shape'])}: naive fp32 logits need {budget['naive_logits_bytes_fp32'] / 2**30:.2f} GiB; "
            f"chunked forward took {budget['seconds']:.1f} s with peak RSS growth "
            f"{budget['peak_rss_growth_bytes'] / 2**20:.0f} MiB (budget {budget['budget_bytes'] / 2**20:.0f} MiB "
            f"+ inputs {budget['inputs_bytes'] / 2**20:.0f} MiB)"
        )
    write()
    failed = [r for r in result["rows"] if r["status"] == "error"]
    return 0 if math.isfinite(peak) and not failed else 1


if __name__ == "__main__":
    sys.exit(main())
