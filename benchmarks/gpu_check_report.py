"""Bookkeeping for benchmarks/gpu_check.sh: one JSON line per part, env.json, and the summary.

    python -m benchmarks.gpu_check_report env OUT_JSON [--site DIR]
    python -m benchmarks.gpu_check_report record PARTS_JSONL --name N --status S --rc RC --seconds T --cap C
                                                 [--json PART_JSON] [--log LOG] [--kind pytest|pytest-collect]
                                                 [--note TEXT]
    python -m benchmarks.gpu_check_report summary OUT_DIR WORK_DIR
    python -m benchmarks.gpu_check_report unzip-wheels WHEEL_DIR SITE_DIR

`record` appends a line to parts.jsonl (the part's status, exit code, seconds, cap, the tail of its log when it
did not succeed, and for pytest parts the counts parsed from its JUnit XML or, for collect-only runs, from its
output). `summary` writes OUT_DIR/results.json (every line of parts.jsonl with the part's own JSON), OUT_DIR/
summary.md and OUT_DIR/logs.tar.gz (the logs and raw JSON under WORK_DIR), so the output folder stays at five
files. `unzip-wheels` is the install fallback for a machine without pip. Only the standard library is imported,
except by `env`, which imports torch.
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path
from xml.etree import ElementTree

from benchmarks.provenance import format_number, git

PACKAGES = ("torch", "triton", "transformers", "accelerate", "deepspeed", "simplejpeg", "datasets",
            "flash_attn", "pydantic", "pandas", "scipy", "pyarrow", "sentencepiece", "safetensors", "numpy")  # fmt: skip
LOG_TAIL_LINES = 40
TAR_MAX_FILE_BYTES = 8 * 2**20


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")


# ---------------------------------------------------------------------------------------------------------------
# env


def _find_package(name: str) -> dict:
    """Version and location of a package without importing it."""
    import importlib.metadata
    import importlib.util

    try:
        spec = importlib.util.find_spec(name)
    except (ImportError, ValueError) as exc:
        return {"error": f"{type(exc).__name__}: {exc}"}
    if spec is None:
        return {"error": f"No module named {name!r}"}
    distribution = {"flash_attn": "flash-attn"}.get(name, name)
    try:
        version = importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        version = None
    return {"version": version, "file": spec.origin, "imported": False}


def environment(site: str | None) -> dict:
    """Machine, GPU, driver and package versions (with where each package was imported from)."""
    env: dict = {
        "date": _now(),
        "host": platform.node(),
        "python": platform.python_version(),
        "executable": sys.executable,
        "cpu_count": os.cpu_count(),
        "git_commit": git("rev-parse", "HEAD"),
        "git_dirty": bool(git("status", "--porcelain")),
        "site_dir": site,
        "smoke": os.environ.get("GPU_CHECK_SMOKE") == "1",
        "packages": {},
    }
    try:
        with open("/proc/meminfo") as f:
            env["memory_total_bytes"] = int(f.readline().split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    for name in PACKAGES:
        if env["smoke"] and name not in ("torch", "triton"):  # smoke mode: find, do not import (saves ~10 s)
            env["packages"][name] = _find_package(name)
            continue
        try:
            module = importlib.import_module(name)
        except Exception as exc:  # missing, or broken (e.g. a binary built against another numpy)
            env["packages"][name] = {"error": f"{type(exc).__name__}: {str(exc)[:200]}"}
            continue
        location = getattr(module, "__file__", None) or ""
        env["packages"][name] = {
            "version": getattr(module, "__version__", None),
            "from_site_dir": bool(site) and location.startswith(str(Path(site).resolve())),
            "file": location,
        }
    try:
        import torch

        env["torch_cuda"] = torch.version.cuda
        env["cuda_available"] = torch.cuda.is_available()
        if torch.cuda.is_available():
            props = torch.cuda.get_device_properties(0)
            env["gpu"] = {
                "name": torch.cuda.get_device_name(0),
                "count": torch.cuda.device_count(),
                "capability": list(torch.cuda.get_device_capability(0)),
                "memory_bytes": props.total_memory,
                "multiprocessors": props.multi_processor_count,
            }
            env["cudnn"] = torch.backends.cudnn.version()
    except Exception as exc:
        env["torch_error"] = f"{type(exc).__name__}: {exc}"
    if shutil.which("nvidia-smi"):
        query = "name,driver_version,memory.total,clocks.max.sm,power.limit,pstate,temperature.gpu"
        try:
            out = subprocess.run(["nvidia-smi", f"--query-gpu={query}", "--format=csv,noheader"],
                                 capture_output=True, text=True, timeout=20)  # fmt: skip
            rows = [[c.strip() for c in line.split(",")] for line in out.stdout.strip().splitlines()]
            env["nvidia_smi"] = [dict(zip(query.split(","), row)) for row in rows]
            if rows:
                env["driver"] = rows[0][1]
        except (OSError, subprocess.TimeoutExpired) as exc:
            env["nvidia_smi_error"] = str(exc)
    env["device"] = (env.get("gpu") or {}).get("name") or f"CPU ({os.cpu_count()} cores)"
    return env


# ---------------------------------------------------------------------------------------------------------------
# parts


def _tail(path: str | None, lines: int = LOG_TAIL_LINES) -> str | None:
    if not path or not os.path.isfile(path):
        return None
    with open(path, errors="replace") as f:
        return "".join(f.readlines()[-lines:])[-6000:]


def parse_junit(path: str) -> dict:
    """Counts and names from a pytest JUnit XML file."""
    root = ElementTree.parse(path).getroot()
    result: dict = {"tests": 0, "passed": [], "failed": [], "errors": [], "skipped": [], "seconds": {}}
    for case in root.iter("testcase"):
        name = f"{case.get('classname', '')}::{case.get('name', '')}".strip(":")
        result["tests"] += 1
        result["seconds"][name] = float(case.get("time") or 0.0)
        outcome = "passed"
        for child in case:
            if child.tag in ("failure", "error"):
                outcome = "failed" if child.tag == "failure" else "errors"
                result[outcome].append({"test": name, "message": (child.get("message") or "")[:500]})
            elif child.tag == "skipped":
                outcome = "skipped"
                result["skipped"].append({"test": name, "reason": (child.get("message") or "")[:300]})
        if outcome == "passed":
            result["passed"].append(name)
    return result


def parse_collect_only(log: str | None) -> dict:
    """`pytest --collect-only -q` output: test ids, the 'N/M tests collected (X deselected)' line, and errors."""
    text = open(log, errors="replace").read() if log and os.path.isfile(log) else ""
    ids = [
        line.strip()
        for line in text.splitlines()
        if "::" in line and not line.startswith(("ERROR", "FAILED"))
    ]
    result: dict = {"collected": len(ids), "test_ids": ids, "collection_errors": []}
    match = re.search(r"(\d+)(?:/(\d+))? tests? collected(?: \((\d+) deselected\))?", text)
    if match:
        result["collected"] = int(match.group(1))
        result["total"] = int(match.group(2) or match.group(1))
        result["deselected"] = int(match.group(3) or 0)
    result["collection_errors"] = sorted(set(re.findall(r"^ERROR (?:collecting )?(\S+)", text, re.M)))
    return result


def record(args) -> None:
    line = {"part": args.name, "status": args.status, "rc": args.rc, "seconds": args.seconds, "cap_s": args.cap,
            "end": _now(), "note": args.note or None, "json": os.path.basename(args.json) if args.json else None}  # fmt: skip
    if args.kind == "pytest" and args.json:
        xml = os.path.splitext(args.json)[0] + ".xml"
        if os.path.isfile(xml):
            parsed = parse_junit(xml)
            Path(args.json).write_text(json.dumps(parsed, indent=1))
            line["tests"] = {
                k: (len(v) if isinstance(v, list) else v) for k, v in parsed.items() if k != "seconds"
            }
        elif args.log:
            # No XML (killed before pytest wrote it): the PASSED/FAILED lines of -v/-rA output still tell.
            text = open(args.log, errors="replace").read() if os.path.isfile(args.log) else ""
            line["tests"] = {
                k: len(re.findall(rf"^\S+::\S+ {k.upper()}", text, re.M)) for k in ("passed", "failed")
            }
    elif args.kind == "pytest-collect":
        parsed = parse_collect_only(args.log)
        if args.json:
            Path(args.json).write_text(json.dumps(parsed, indent=1))
        line["tests"] = {
            "collected": parsed["collected"],
            "collection_errors": len(parsed["collection_errors"]),
        }
    if args.status != "ok":
        line["log_tail"] = _tail(args.log)
    with open(args.parts, "a") as f:
        f.write(json.dumps(line) + "\n")


# ---------------------------------------------------------------------------------------------------------------
# summary


def _load(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _pct(value) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


def _table(header: list[str], rows: list[list]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return lines + ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]


def _summary_tests(name: str, data: dict) -> list[str]:
    if "test_ids" in data:  # collect-only
        lines = [f"`{name}`: collect-only, {data['collected']} tests collected"
                 + (f", collection errors in {', '.join(data['collection_errors'])}" if data["collection_errors"] else
                    ", no collection errors") + "."]  # fmt: skip
        return lines + [f"- `{t}`" for t in data["test_ids"]]
    lines = [f"`{name}`: {len(data['passed'])} passed, {len(data['failed'])} failed, {len(data['errors'])} errors, "
             f"{len(data['skipped'])} skipped."]  # fmt: skip
    for key in ("failed", "errors"):
        for item in data[key]:
            lines.append(
                f"- {key[:-1] if key == 'errors' else 'failed'}: `{item['test']}`: {item['message'][:300]}"
            )
    for item in data["skipped"]:
        lines.append(f"- skipped: `{item['test']}`: {item['reason']}")
    slow = sorted(((t, s) for t, s in data.get("seconds", {}).items() if s >= 0.5), key=lambda kv: -kv[1])[:8]
    if slow:
        lines.append("- seconds: " + ", ".join(f"`{t.split('::')[-1]}` {s:.1f}" for t, s in slow))
    return lines


def _summary_kernels(data: dict) -> list[str]:
    lines = [f"{data.get('device')}, {data.get('dtype')}, torch {data.get('torch')}, triton {data.get('triton')}; "
             f"dense matmul peak measured in this run: **{format_number(data.get('matmul_tflops'))} TFLOP/s**"
             f"{' (8192³)' if data.get('matmul_peak_shape') else ''}. Credited FLOPs: fwd 2NKD, fwd+bwd 12NKD; "
             "executed: each method's GEMMs, recomputation included.", ""]  # fmt: skip
    rows = []
    for r in data.get("rows", []):
        ms = f"{1e3 * r['seconds']:.2f}" if r.get("seconds") else r.get("status", "-")
        mem = "-" if r.get("memory_bytes") is None else f"{r['memory_bytes'] / 2**20:,.0f}"
        rows.append([r["N"], r["K"], r["D"], r.get("pass_"), r["method"], ms, mem, format_number(r.get("tflops")),
                     _pct(r.get("fraction_of_matmul_peak")), format_number(r.get("executed_flops", 0) / 1e12),
                     _pct(r.get("executed_fraction_of_matmul_peak"))])  # fmt: skip
    lines += _table(["N", "K", "D", "pass", "method", "ms", "MiB", "TFLOP/s (credited)", "% peak",
                     "executed TFLOP", "executed % peak"], rows)  # fmt: skip
    kernels = (data.get("triton_kernels") or {}).get("kernels") or []
    if kernels:
        lines += ["", "Triton kernels compiled in the run:", ""]
        lines += _table(["kernel", "constexprs", "registers", "spills", "shared bytes", "warps", "stages"],
                        [[k["kernel"], ", ".join(f"{a}={b}" for a, b in (k.get("constants") or {}).items()),
                          format_number(k.get("n_regs")), format_number(k.get("n_spills")), format_number(k.get("shared_bytes")),
                          format_number(k.get("num_warps")), format_number(k.get("num_stages"))] for k in kernels])  # fmt: skip
    elif data.get("triton_kernels"):
        lines += ["", f"Triton kernels: {data['triton_kernels'].get('note')}"]
    return lines


def _summary_train(parts: dict[str, dict], meta: dict) -> list[str]:
    arms, configs = {}, []
    for data in parts.values():
        for arm, summary in (data.get("arms") or {}).items():
            arms[arm] = (summary, data)
    if not arms:
        return []
    rows = []
    keys = [("tokens/s", "tokens_per_s", format_number), ("images/s", "images_per_s", format_number),
            ("step time median (ms)", "step_time_median_s", lambda v: format_number(None if v is None else 1e3 * v)),
            ("peak memory (GiB)", "peak_memory_bytes", lambda v: format_number(None if v is None else v / 2**30)),
            ("TFLOP/s", "tflops", format_number), ("MFU", "mfu", _pct), ("data loading, % of step", "data_loading_fraction", _pct),
            ("first loss", "first_loss", format_number)]  # fmt: skip
    for label, key, fmt in keys:
        cells = [fmt(arms[a][0].get(key)) if a in arms else "-" for a in ("ours", "baseline")]
        if key == "data_loading_fraction" and "baseline" in arms:
            cells[1] = "(pre-loaded)"
        rows.append([label] + cells)
    if "ours" in arms and "baseline" in arms:
        ours, base = arms["ours"][0], arms["baseline"][0]
        rows.append(["ours / baseline tokens/s", format_number(ours["tokens_per_s"] / base["tokens_per_s"]), ""])
    for _arm_summary, data in arms.values():
        setup = data.get("setup", {})
        configs.append(f"`{data.get('config')}`, micro-batch {setup.get('micro_batch_size')} x {setup.get('seq_len')}, "
                       f"{setup.get('timed_steps')} timed steps after {setup.get('warmup_steps')}")  # fmt: skip
    lines = ["Config " + "; ".join(sorted(set(configs))) + ".", ""]
    lines += _table(["", "ours", "HF Trainer + DeepSpeed"], rows)
    ours = arms.get("ours", (None, None))
    if ours[0]:
        breakdown = ours[0].get("flops_breakdown_first_micro_batch") or {}
        peak = (ours[1].get("env") or {}).get("peak") or {}
        if breakdown:
            lines += ["", f"Forward FLOPs of the first micro-batch: {format_number(breakdown.get('forward_flops', 0) / 1e12)} "
                      f"TFLOP, of which Triton codebook kernels {format_number(breakdown.get('codebook_forward_flops', 0) / 1e12)} "
                      f"TFLOP ({breakdown.get('codebook_kernel_calls')} calls; they execute "
                      f"{format_number(breakdown.get('codebook_executed_flops_fwd_bwd', 0) / 1e12)} TFLOP forward + backward)."]  # fmt: skip
        if peak.get("flops_per_second"):
            source = peak.get("source")
            if source == "env" and meta.get("peak_source"):
                source = meta["peak_source"]
            lines += ["", f"MFU against {format_number(peak['flops_per_second'] / 1e12)} TFLOP/s ({source})."]
    return lines


def summary(out_dir: Path, work: Path) -> None:
    parts_path = out_dir / "parts.jsonl"
    parts = []
    if parts_path.is_file():
        parts = [json.loads(line) for line in parts_path.read_text().splitlines() if line.strip()]
    env = _load(out_dir / "env.json") or {}
    meta = _load(work / "meta.json") or {}
    part_json = {p["part"]: _load(work / "parts" / p["json"]) for p in parts if p.get("json")}
    results = {"meta": meta, "env": env, "parts": parts, "results": part_json}
    (out_dir / "results.json").write_text(json.dumps(results, indent=1) + "\n")

    packages = env.get("packages", {})
    versions = ", ".join(
        f"{name} {info['version']}" for name, info in packages.items() if info.get("version")
    )
    missing = ", ".join(name for name, info in packages.items() if "error" in info)
    total = sum(p.get("seconds") or 0 for p in parts)
    lines = [f"# GPU check{' (CPU smoke mode)' if meta.get('smoke') else ''}", "",
             f"{env.get('device', 'unknown device')}"
             + (f", driver {env['driver']}" if env.get("driver") else "")
             + f", Python {env.get('python')}; commit `{(env.get('git_commit') or 'unknown')[:10]}`"
             + (" + uncommitted changes" if env.get("git_dirty") else "") + f"; started {meta.get('start', '-')}, "
             f"budget {meta.get('budget_s', '-')} s, {total:.0f} s in parts"
             + ("" if meta.get("finished") else " (still running or interrupted)") + ".", "",
             f"Packages: {versions or '-'}." + (f" Not importable: {missing}." if missing else ""), ""]  # fmt: skip
    if meta.get("wheels"):
        lines += [f"Wheels: {meta['wheels']}.", ""]
    lines += ["## Parts", ""]
    lines += _table(["part", "status", "exit", "seconds", "cap (s)", "note"],
                    [[p["part"], p["status"], format_number(p.get("rc")), format_number(p.get("seconds")), format_number(p.get("cap_s")),
                      p.get("note") or ""] for p in parts])  # fmt: skip
    for p in parts:
        data = part_json.get(p["part"])
        if p["part"].endswith("tests") or p["part"].endswith("test"):
            if data:
                lines += ["", f"## {p['part']}", ""] + _summary_tests(p["part"], data)
        elif p["part"] == "kernel_bench" and data:
            lines += ["", "## Kernel benchmark", ""] + _summary_kernels(data)
    train = {
        p["part"]: part_json[p["part"]]
        for p in parts
        if p["part"].startswith("train") and part_json.get(p["part"])
    }
    if train:
        lines += ["", "## Training throughput", ""] + _summary_train(train, meta)
    failed = [p for p in parts if p["status"] not in ("ok", "skipped") and p.get("log_tail")]
    for p in failed:
        lines += ["", f"## {p['part']}: {p['status']} (log tail)", "", "```", p["log_tail"].rstrip(), "```"]
    (out_dir / "summary.md").write_text("\n".join(lines) + "\n")

    with tarfile.open(out_dir / "logs.tar.gz", "w:gz") as tar:
        for path in sorted(work.rglob("*")):
            rel = path.relative_to(work)
            if not path.is_file() or rel.parts[0] in ("site", "data", "triton_cache"):
                continue
            if path.suffix not in (".log", ".txt", ".json", ".jsonl", ".xml", ".md"):
                continue
            if path.stat().st_size > TAR_MAX_FILE_BYTES:
                continue
            tar.add(path, arcname=str(Path("gpu_check") / rel))


def unzip_wheels(wheel_dir: Path, site: Path) -> None:
    """What `pip install --no-deps --target` does for these wheels, for a machine without pip: unpack each wheel
    into the site directory (the .data/purelib and .data/platlib folders are merged in; scripts are skipped)."""
    site.mkdir(parents=True, exist_ok=True)
    for wheel in sorted(wheel_dir.glob("*.whl")):
        with zipfile.ZipFile(wheel) as archive:
            for member in archive.namelist():
                parts = member.split("/")
                if parts[0].endswith(".data"):
                    if len(parts) < 3 or parts[1] not in ("purelib", "platlib"):
                        continue
                    target = site.joinpath(*parts[2:])
                else:
                    target = site / member
                if member.endswith("/"):
                    continue
                target.parent.mkdir(parents=True, exist_ok=True)
                with archive.open(member) as src, open(target, "wb") as dst:
                    shutil.copyfileobj(src, dst)
        print(f"unpacked {wheel.name}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.gpu_check_report", description=__doc__.split("\n\n")[0]
    )
    sub = parser.add_subparsers(dest="command", required=True)
    p_env = sub.add_parser("env")
    p_env.add_argument("out")
    p_env.add_argument("--site", default=None)
    p_rec = sub.add_parser("record")
    p_rec.add_argument("parts")
    p_rec.add_argument("--name", required=True)
    p_rec.add_argument("--status", required=True)
    p_rec.add_argument("--rc", type=int, default=None)
    p_rec.add_argument("--seconds", type=float, default=None)
    p_rec.add_argument("--cap", type=int, default=None)
    p_rec.add_argument("--json", default=None)
    p_rec.add_argument("--log", default=None)
    p_rec.add_argument("--kind", default=None, choices=("pytest", "pytest-collect"))
    p_rec.add_argument("--note", default=None)
    p_sum = sub.add_parser("summary")
    p_sum.add_argument("out_dir")
    p_sum.add_argument("work")
    p_unzip = sub.add_parser("unzip-wheels")
    p_unzip.add_argument("wheel_dir")
    p_unzip.add_argument("site")
    args = parser.parse_args(argv)
    if args.command == "env":
        data = environment(args.site)
        Path(args.out).write_text(json.dumps(data, indent=1) + "\n")
        print(f"{data['device']}; python {data['python']}; " + ", ".join(
            f"{k} {v.get('version', 'MISSING')}" for k, v in data["packages"].items()))  # fmt: skip
    elif args.command == "record":
        record(args)
    elif args.command == "summary":
        summary(Path(args.out_dir), Path(args.work))
    else:
        unzip_wheels(Path(args.wheel_dir), Path(args.site))
    return 0


if __name__ == "__main__":
    sys.exit(main())
