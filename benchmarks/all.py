"""Run every benchmark that fits this machine, then regenerate the MEASURED section of BENCHMARKS.md.

    python -m benchmarks.all [--quick] [--only NAME ...] [--render-only]

Each benchmark runs in its own subprocess (`python -m benchmarks.<name> ...`) and writes its JSON into
benchmarks/results/. On CPU: codebook_lookup (small shapes), data_pipeline, checkpoint and train_throughput (tiny);
on CUDA the codebook benchmark runs at the paper's shapes and train_throughput at gpu1b. `--quick` passes each
benchmark its smallest options (a few minutes in all on 2 cores). A benchmark that is missing or fails is reported
and skipped; the others still run. Then BENCHMARKS.md's text between `<!-- benchmarks:all:begin -->` and
`<!-- benchmarks:all:end -->` is rebuilt from every JSON file in benchmarks/results/ (including ones measured on
another machine and committed), each table headed by the machine, date and commit it was measured on; text
outside the markers is left alone. benchmarks/results/all.json records each run (command, exit code, seconds,
machine, date, commit). `--render-only` rebuilds the section from the existing JSON without running anything.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from benchmarks.provenance import REPO_ROOT, cpu_model, format_number, git

RESULTS = REPO_ROOT / "benchmarks" / "results"
DOC = REPO_ROOT / "BENCHMARKS.md"
BEGIN, END = "<!-- benchmarks:all:begin -->", "<!-- benchmarks:all:end -->"


@dataclass
class Run:
    """One benchmark invocation: `python -m module *args <json_flag> RESULTS/json_name`."""

    name: str
    module: str
    json_name: str
    args: list[str] = field(default_factory=list)
    json_flag: str = "--json"


def plan(quick: bool, cuda: bool) -> list[Run]:
    """The runs that fit this machine."""
    runs = []
    if cuda:
        runs.append(Run("codebook_lookup", "benchmarks.codebook_lookup", "codebook_lookup_paper.json",
                        ["--shapes", "paper"] + (["--repeats", "5", "--skip-budget-check"] if quick else [])))  # fmt: skip
    else:
        runs.append(Run("codebook_lookup", "benchmarks.codebook_lookup", "codebook_lookup.json",
                        ["--shapes", "small"] + (["--repeats", "1", "--skip-budget-check"] if quick else [])))  # fmt: skip
    runs.append(Run("data_pipeline", "benchmarks.data_pipeline", "data_pipeline.json",
                    ["--samples", "100" if quick else "600"], json_flag="--out"))  # fmt: skip
    runs.append(Run("checkpoint", "benchmarks.checkpoint", "checkpoint.json", ["--size", "small" if quick else "default"]))  # fmt: skip
    if cuda:
        runs.append(Run("train_throughput", "benchmarks.train_throughput", "train_throughput_gpu1b.json",
                        ["--config", "gpu1b"] + (["--steps", "8", "--warmup", "3"] if quick else [])))  # fmt: skip
    else:
        runs.append(Run("train_throughput", "benchmarks.train_throughput", "train_throughput_tiny.json",
                        ["--config", "tiny"] + (["--steps", "10", "--warmup", "3"] if quick else ["--repeats", "3"])))  # fmt: skip
    return runs


# ---------------------------------------------------------------------------------------------------------------
# running


def machine() -> str:
    try:
        import torch

        if torch.cuda.is_available():
            return f"{torch.cuda.get_device_name()} + {os.cpu_count()} CPU cores"
    except ImportError:
        pass
    return f"{cpu_model() or 'CPU'}, {os.cpu_count()} cores"


def run_one(run: Run) -> dict:
    out = RESULTS / run.json_name
    cmd = [sys.executable, "-m", run.module, *run.args, run.json_flag, str(out.relative_to(REPO_ROOT))]
    shown = "python -m " + " ".join([run.module, *run.args, run.json_flag, str(out.relative_to(REPO_ROOT))])
    record = {
        "name": run.name,
        "command": shown,
        "json": run.json_name,
        "machine": machine(),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "git_commit": git("rev-parse", "HEAD"),
        "git_dirty": bool(git("status", "--porcelain")),
        "load_average_before": list(os.getloadavg()),
    }
    if importlib.util.find_spec(run.module) is None:
        print(f"== {run.name}: {run.module} is not there (yet); skipped", flush=True)
        return {**record, "status": "missing", "returncode": None}
    print(f"== {run.name}: {shown}", flush=True)
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO_ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    log = RESULTS / f"{Path(run.json_name).stem}.log"
    log.write_text(proc.stdout + ("\n--- stderr ---\n" + proc.stderr if proc.stderr else ""))
    status = "ok" if proc.returncode == 0 and out.is_file() else "failed"
    tail = "\n".join(proc.stdout.strip().splitlines()[-25:])
    print(tail, flush=True)
    if status != "ok":
        print(f"== {run.name} FAILED (exit {proc.returncode}); see {log.relative_to(REPO_ROOT)}:\n"
              f"{proc.stderr.strip()[-2000:]}", flush=True)  # fmt: skip
    return {**record, "status": status, "returncode": proc.returncode, "seconds": round(seconds, 1)}


# ---------------------------------------------------------------------------------------------------------------
# rendering


def _mib(value) -> str:
    return "-" if value is None else f"{value / 2**20:,.0f}"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return lines


def _provenance(record: dict | None, data: dict) -> str:
    env = data.get("env") or {}
    record = record or {}
    where = (
        env.get("device")
        or record.get("machine")
        or (data.get("device") if isinstance(data.get("device"), str) else None)
    )
    date = env.get("date") or data.get("date") or record.get("date")
    commit = env.get("git_commit") or data.get("git_commit") or record.get("git_commit")
    dirty = env.get("git_dirty", record.get("git_dirty"))
    commit_text = (
        f"`{commit[:10]}`" + (" + uncommitted changes" if dirty else "") if commit else "unknown commit"
    )
    command = record.get("command") or data.get("command")
    text = f"Measured on {where or 'an unrecorded machine'}, {date or 'unrecorded date'}, {commit_text}."
    if command:
        text += f" Command: `{command}`."
    return text


def render_codebook(data: dict) -> list[str]:
    lines = [f"Device {data.get('device')}, {data.get('dtype')}, measured matmul peak "
             f"{format_number(data.get('matmul_tflops'))} TFLOP/s ({data.get('flops_convention', '')}).", ""]  # fmt: skip
    rows = []
    for r in data.get("rows", []):
        rows.append([r["N"], r["K"], r["D"], r.get("pass_"), r["method"],
                     "OOM" if r["seconds"] is None else f"{1e3 * r['seconds']:.2f}",
                     _mib(r.get("memory_bytes")), format_number(r.get("tflops")),
                     "-" if r.get("fraction_of_matmul_peak") is None else f"{100 * r['fraction_of_matmul_peak']:.1f}%"])  # fmt: skip
    lines += _table(
        ["N", "K", "D", "pass", "method", "ms", "memory MiB", "TFLOP/s", "% of matmul peak"], rows
    )
    budget = data.get("budget_check")
    if budget:
        lines += ["", f"Memory bound: the chunked forward at {tuple(budget['shape'])}, whose fp32 logits would take "
                  f"{budget['naive_logits_bytes_fp32'] / 2**30:.2f} GiB, grew peak RSS by "
                  f"{budget['peak_rss_growth_bytes'] / 2**20:.0f} MiB (budget {budget['budget_bytes'] / 2**20:.0f} MiB "
                  f"+ inputs {budget['inputs_bytes'] / 2**20:.0f} MiB) in {budget['seconds']:.1f} s."]  # fmt: skip
    return lines


def render_data_pipeline(data: dict) -> list[str]:
    meta = data.get("meta", {})
    lines = [f"{meta.get('samples')} samples per resolution; rates are samples per CPU-second of one process "
             "(per worker core), the loader rows are wall-clock; 'vs step' is the loader's rate over a training "
             "step's consumption (64 images per 1 s step; target >= 2).", ""]  # fmt: skip
    rows = []
    for r in data.get("results", []):
        rows.append([r["resolution"], r.get("source", ""), format_number(r.get("read_mb_s")), format_number(r.get("decode_resize_samples_s")),
                     format_number(r.get("process_samples_s")), format_number(r.get("pack_collate_samples_s")),
                     format_number(r.get("loader_w0_samples_s")), format_number(r.get("loader_w2_samples_s")),
                     format_number(r.get("loader_w2_vs_step"))])  # fmt: skip
    lines += _table(["px", "source", "read MB/s", "decode+resize /s", "process /s", "pack /s", "loader 0 workers /s",
                     "loader 2 workers /s", "2 workers vs step"], rows)  # fmt: skip
    return lines


_SKIP_KEYS = {"machine", "versions", "date", "git_commit", "git_dirty", "command", "env", "meta", "device"}


def render_generic(data: dict) -> list[str]:
    """Top-level scalars as a two-column table (schemas of benchmarks written elsewhere may change)."""
    rows = []
    for key, value in data.items():
        if key in _SKIP_KEYS or isinstance(value, (dict, list)):
            continue
        if key.endswith("_bytes") and isinstance(value, (int, float)):
            rows.append([key, f"{value / 2**20:,.1f} MiB"])
        else:
            rows.append([key, format_number(value)])
    return _table(["quantity", "value"], rows)


def render_train_throughput(data: dict) -> list[str]:
    if set(data["arms"]) != {
        "ours",
        "baseline",
    }:  # `--arms ours` or `--arms baseline` (benchmarks/gpu_check.sh)
        return render_train_throughput_one_arm(data)
    ours, base, ratios, setup = data["arms"]["ours"], data["arms"]["baseline"], data["ratios"], data["setup"]
    params = setup.get("params", {})

    def count(n):
        return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M" if n >= 1e6 else f"{n:,}"

    repeats = setup.get("repeats", 1)
    lines = [f"Config `{data['config']}`: {count(params.get('total', 0))} parameters (LLM {count(params.get('llm', 0))}, "
             f"tokenizer {count(params.get('tokenizer', 0))}), {setup['precision']}, micro-batch "
             f"{setup['micro_batch_size']} x {setup['seq_len']} positions, {setup['image_size'][0]}x"
             f"{setup['image_size'][1]} images, {setup['timed_steps']} timed steps after {setup['warmup_steps']} "
             f"warm-up" + (f", the median of {repeats} repeats" if repeats > 1 else "")
             + (f", the two arms taking turns every {setup['interleave_steps']} steps"
                if setup.get("interleave_steps") else "")
             + (f" (ours / baseline per repeat: {', '.join(f'{r:.3f}' for r in data['ratio_per_repeat'])})"
                if data.get("ratio_per_repeat") and repeats > 1 else "")
             + (f", {setup['cpu_threads_per_arm']} CPU thread per arm" if setup.get("cpu_threads_per_arm") else "")
             + f"; torch {data['env'].get('torch')}, deepspeed {data['env'].get('deepspeed')}, transformers "
             f"{data['env'].get('transformers')}.", ""]  # fmt: skip
    if setup.get("baseline_zero_overrides"):
        lines[-2:-1] = [
            lines[-2] + f" Baseline ZeRO overrides (diagnostic): `{setup['baseline_zero_overrides']}`."
        ]

    def pct(v):
        return "-" if v is None else f"{100 * v:.2f}%"

    rows = [
        ["tokens/s", format_number(ours["tokens_per_s"]), format_number(base["tokens_per_s"]), format_number(ratios["tokens_per_s"])],
        ["images/s", format_number(ours["images_per_s"]), format_number(base["images_per_s"]), format_number(ratios["images_per_s"])],
        [
            "step time, median (ms)",
            format_number(1e3 * ours["step_time_median_s"]),
            format_number(1e3 * base["step_time_median_s"]),
            format_number(ratios["step_time"]),
        ],  # fmt: skip
        [
            f"peak memory (MiB, {ours['memory_kind']})",
            _mib(ours["peak_memory_bytes"]),
            _mib(base["peak_memory_bytes"]),
            format_number(ratios["peak_memory"]),
        ],  # fmt: skip
        ["TFLOP/s (training/flops.py)", format_number(ours["tflops"]), format_number(base["tflops"]), "-"],
        ["MFU", pct(ours["mfu"]), pct(base["mfu"]), "-"],
        ["data loading, % of step time", pct(ours["data_loading_fraction"]), "(pre-loaded)", "-"],
        ["first-step loss", f"{ours['first_loss']:.6f}", f"{base['first_loss']:.6f}", "-"],
    ]
    lines += _table(["", "ours", "HF Trainer + DeepSpeed", "ours / baseline"], rows)
    targets = data.get("targets", {})
    verdict = []
    ratio = ratios["tokens_per_s"]
    verdict.append(f"throughput ratio {ratio:.2f}x (target >= 1.2x: {'met' if targets.get('throughput_ratio_met') else 'MISSED'})")  # fmt: skip
    verdict.append(f"data loading {pct(ours['data_loading_fraction'])} of step time (target <= 2%: "
                   f"{'met' if targets.get('data_loading_met') else 'MISSED'})")  # fmt: skip
    if targets.get("mfu_met") is not None:
        verdict.append(f"MFU {pct(ours['mfu'])} (target >= 40%: {'met' if targets['mfu_met'] else 'MISSED'})")
    checks = (f"Same batches in both arms: {format_number(data['same_batches'])}; first-step losses differ by "
              f"{data['first_loss_abs_diff']:.1e}.")  # fmt: skip
    if setup.get("baseline_zero_overrides"):
        lines += ["", f"Diagnostic run (the baseline's ZeRO settings changed), not the target comparison: ratio "
                  f"{ratio:.2f}x, data loading {pct(ours['data_loading_fraction'])}. " + checks]  # fmt: skip
    else:
        lines += ["", "Targets: " + "; ".join(verdict) + ". " + checks]
    return lines


def render_train_throughput_one_arm(data: dict) -> list[str]:
    """A train_throughput JSON with one arm (no ratios, no cross-arm checks)."""
    (arm, summary), setup = next(iter(data["arms"].items())), data["setup"]
    name = {"ours": "ours", "baseline": "HF Trainer + DeepSpeed"}[arm]
    lines = [f"Config `{data['config']}`, one arm ({name}), {setup['precision']}, micro-batch "
             f"{setup['micro_batch_size']} x {setup['seq_len']} positions, {setup['timed_steps']} timed steps after "
             f"{setup['warmup_steps']} warm-up; torch {data['env'].get('torch')}, deepspeed "
             f"{data['env'].get('deepspeed')}.", ""]  # fmt: skip
    peak = (data["env"].get("peak") or {}).get("flops_per_second")
    rows = [
        ["tokens/s", format_number(summary["tokens_per_s"])],
        ["images/s", format_number(summary["images_per_s"])],
        ["step time, median (ms)", format_number(1e3 * summary["step_time_median_s"])],
        [f"peak memory (MiB, {summary['memory_kind']})", _mib(summary["peak_memory_bytes"])],
        ["TFLOP/s (training/flops.py)", format_number(summary["tflops"])],
        ["MFU" + (f" (peak {format_number(peak / 1e12)} TFLOP/s)" if peak else ""),
         "-" if summary["mfu"] is None else f"{100 * summary['mfu']:.2f}%"],
        ["data loading, % of step time",
         "-" if summary.get("data_loading_fraction") is None else f"{100 * summary['data_loading_fraction']:.2f}%"],
        ["first-step loss", format_number(summary["first_loss"], 6)],
    ]  # fmt: skip
    return lines + _table(["", name], rows)


RENDERERS = {
    "codebook_lookup": ("Codebook lookup kernels", render_codebook),
    "data_pipeline": ("Data pipeline", render_data_pipeline),
    "checkpoint": ("Checkpoint save / load / export", render_generic),
    "train_throughput": (
        "Training throughput: ours vs HF Trainer + DeepSpeed ZeRO-3",
        render_train_throughput,
    ),
}


def render_section(manifest: dict) -> str:
    lines = [BEGIN, "", "## Measured", "",
             "_Generated by `python -m benchmarks.all` from benchmarks/results/*.json; edits here are overwritten._", ""]  # fmt: skip
    for name, (title, renderer) in RENDERERS.items():
        files = sorted(RESULTS.glob(f"{name}*.json")) if RESULTS.is_dir() else []
        record_by_file = {r["json"]: r for r in manifest.get("runs", {}).values() if r.get("name") == name}
        lines += [f"### {title}", ""]
        failed = [r for r in record_by_file.values() if r.get("status") not in ("ok", None)]
        for r in failed:
            lines += [f"Last run of `{r['command']}` ({r['date']}): {r['status']}"
                      + (f" (exit {r['returncode']})" if r.get("returncode") is not None else "") + ".", ""]  # fmt: skip
        if not files:
            lines += ["No results yet.", ""]
            continue
        for path in files:
            try:
                data = json.loads(path.read_text())
                body = renderer(data)
            except (OSError, ValueError, KeyError, TypeError) as exc:
                lines += [f"`{path.name}`: could not be read ({type(exc).__name__}: {exc}).", ""]
                continue
            lines += [
                f"`benchmarks/results/{path.name}`. " + _provenance(record_by_file.get(path.name), data),
                "",
            ]
            lines += body + [""]
    lines.append(END)
    return "\n".join(lines)


def update_doc(section: str) -> None:
    text = DOC.read_text() if DOC.is_file() else "# Benchmarks\n\n"
    if BEGIN in text and END in text:
        head, rest = text.split(BEGIN, 1)
        _, tail = rest.split(END, 1)
        text = head + section + tail
    else:
        text = text.rstrip("\n") + "\n\n" + section + "\n"
    DOC.write_text(text)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.all", description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 2)[2],
    )  # fmt: skip
    parser.add_argument("--quick", action="store_true", help="each benchmark at its smallest options")
    parser.add_argument("--only", nargs="*", default=None, help="run only these benchmarks (names as below)")
    parser.add_argument("--render-only", action="store_true", help="only rebuild BENCHMARKS.md from the JSON")
    args = parser.parse_args(argv)

    RESULTS.mkdir(parents=True, exist_ok=True)
    manifest_path = RESULTS / "all.json"
    manifest = json.loads(manifest_path.read_text()) if manifest_path.is_file() else {"runs": {}}
    failures = 0
    if not args.render_only:
        import torch

        cuda = torch.cuda.is_available()
        runs = plan(args.quick, cuda)
        if not cuda:
            print(
                "no CUDA GPU: the gpu1b training configuration and the paper-size kernel shapes are skipped"
            )
        for run in runs:
            if args.only is not None and run.name not in args.only:
                continue
            record = run_one(run)
            manifest["runs"][run.json_name] = record
            failures += record["status"] == "failed"
            manifest_path.write_text(json.dumps(manifest, indent=1) + "\n")
    update_doc(render_section(manifest))
    print(f"updated {DOC.relative_to(REPO_ROOT)} between {BEGIN} and {END}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
