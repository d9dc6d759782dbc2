"""Fused linear cross-entropy benchmark: naive F.cross_entropy(h @ W.T) vs the chunked torch path (and the Triton
kernel on CUDA), forward + backward, at the LM head's and the t2i visual head's shapes.

    python -m benchmarks.linear_cross_entropy [--shapes smoke|paper] [--naive-rows N] [--json OUT]

Shapes (N rows, V classes, C hidden): `paper` is N = 8,192 at V = 151,936 (Qwen2.5's vocabulary) and V = 131,072
(the IBQ codebook, t2i visual head), C = 1,536. Every arm runs once, in its own child process, on fp32 inputs on
CPU (bf16 on CUDA) with 10% of the labels ignored: forward, then backward of the mean CE into dh and dW. Memory:
on CPU the growth of the child's peak RSS over its RSS once the inputs exist; on CUDA the peak allocated bytes
over the inputs. Both include the gradients themselves (dh [N, C] and dW [V, C], listed as `gradient_bytes`), so
the chunked path's bound is budget + gradients: its tile temporaries stay within `budget_bytes`
(modeling/kernels/reference.py MEMORY_BUDGET_BYTES). The naive arm's N x V fp32 logits, their softmax and its
gradient need 3 x 4 N V bytes, too much beside other jobs on a 24-GiB machine at N = 8,192, so `--naive-rows`
(default 2,048) runs it at fewer rows; its time and memory scale linearly in N.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from datetime import UTC, datetime

from benchmarks.provenance import REPO_ROOT, cpu_model, format_number, git

SHAPES = {
    "smoke": [("lm head", 256, 1024, 64), ("t2i head", 256, 512, 64)],
    "paper": [("lm head", 8192, 151936, 1536), ("t2i head", 8192, 131072, 1536)],
}
IGNORED_FRACTION = 0.1


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def run_arm(method: str, n: int, v: int, dim: int, device: str) -> dict:
    """Child process: one forward + backward of `method` ('naive', 'chunked torch', 'triton'); time and memory."""
    import torch
    import torch.nn.functional as F

    from modeling.kernels import linear_cross_entropy

    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(n, dim, generator=gen).to(device, dtype).requires_grad_(True)
    weight = (torch.randn(v, dim, generator=gen) * dim**-0.5).to(device, dtype).requires_grad_(True)
    labels = torch.randint(0, v, (n,), generator=gen)
    labels[torch.rand(n, generator=gen) < IGNORED_FRACTION] = -100
    labels = labels.to(device)

    def step():
        if method == "naive":
            loss = F.cross_entropy((hidden @ weight.T).float(), labels)
        else:
            backend = "torch" if method == "chunked torch" else "triton"
            totals = linear_cross_entropy(hidden, weight, labels, backend=backend)
            loss = totals.loss_sum / totals.count
        loss.backward()
        return loss

    if device == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    else:
        base = _rss_bytes()
    start = time.perf_counter()
    loss = step()
    if device == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    if device == "cuda":
        peak_growth = torch.cuda.max_memory_allocated() - base
    else:
        peak_growth = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
    return {
        "seconds": seconds,
        "peak_memory_growth_bytes": peak_growth,
        "gradient_bytes": hidden.grad.nbytes + weight.grad.nbytes,
        "loss": float(loss),
    }


def _child(method: str, n: int, v: int, dim: int, device: str) -> dict:
    code = (
        "import json; from benchmarks.linear_cross_entropy import run_arm; "
        f"print('RESULT', json.dumps(run_arm({method!r}, {n}, {v}, {dim}, {device!r})))"
    )
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=REPO_ROOT
    )
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        return {"error": (proc.stderr or proc.stdout)[-2000:]}
    return json.loads(lines[-1].removeprefix("RESULT "))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--shapes", choices=sorted(SHAPES), default="paper")
    parser.add_argument(
        "--naive-rows",
        type=int,
        default=2048,
        help="rows N of the naive arm (default 2,048; the others use N)",
    )
    parser.add_argument("--json", dest="json_out", default=None, help="write results to this JSON file")
    args = parser.parse_args(argv)

    import torch

    from modeling.kernels import reference

    device = "cuda" if torch.cuda.is_available() else "cpu"
    methods = ["naive", "chunked torch"] + (["triton"] if device == "cuda" else [])
    result = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "git_commit": git("rev-parse", "HEAD"),
        "machine": {"cpu_model": cpu_model(), "cpu_count": os.cpu_count(), "device": device},
        "torch_threads": torch.get_num_threads(),
        "budget_bytes": reference.MEMORY_BUDGET_BYTES,
        "rows": [],
    }
    print(f"device {device}, chunked budget {reference.MEMORY_BUDGET_BYTES / 2**20:.0f} MiB", flush=True)
    print("| head | N | V | C | method | s (fwd+bwd) | peak memory growth MiB | of it gradients MiB |")
    print("|---|---|---|---|---|---|---|---|")
    for head, n, v, dim in SHAPES[args.shapes]:
        for method in methods:
            rows = min(n, args.naive_rows) if method == "naive" else n
            arm = _child(method, rows, v, dim, device)
            result["rows"].append({"head": head, "n": rows, "v": v, "c": dim, "method": method, **arm})
            if "error" in arm:
                print(f"| {head} | {rows} | {v} | {dim} | {method} | failed: {arm['error'][-200:]!r} | | |")
                continue
            cells = (
                head,
                rows,
                v,
                dim,
                method,
                arm["seconds"],
                arm["peak_memory_growth_bytes"] / 2**20,
                arm["gradient_bytes"] / 2**20,
            )
            print("| " + " | ".join(format_number(c) for c in cells) + " |", flush=True)
            if args.json_out:
                with open(args.json_out, "w") as f:
                    json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
