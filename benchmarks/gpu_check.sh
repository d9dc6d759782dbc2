#!/usr/bin/env bash
# Every GPU measurement of the project in one command, for one H100/H200 with Python 3.12 and no network.
#
#   benchmarks/gpu_check.sh [--smoke] [OUT_DIR]
#
# OUT_DIR: the argument, else $OUT, else runs/gpu_check/. It receives five files, rewritten after every part so
# that a run killed half-way still returns what finished (an EXIT trap writes them a last time):
#   parts.jsonl   one JSON line per part: status (ok, failed, timeout, skipped), exit code, seconds, cap, log tail
#   env.json      GPU name, driver, CUDA, torch/triton/deepspeed/... versions and where each was imported from
#   results.json  parts.jsonl plus each part's own JSON (pytest results, the kernel benchmark, training throughput)
#   summary.md    the same as tables: tests, kernel timings against the matmul peak, registers/spills, MFU
#   logs.tar.gz   every part's log, raw JSON and JUnit XML
#
# The machine needs: an NVIDIA GPU with its driver, Python 3.12 with pip and torch (CUDA build), triton,
# transformers, accelerate, pyarrow, sentencepiece, safetensors, tensorboard, matplotlib and pytest. The rest
# (deepspeed, simplejpeg, datasets, and their requirements) comes from a wheel folder, by default
# gpu_wheels/ at the repository root (GPU_CHECK_WHEELS overrides), built on any machine with network by
# benchmarks/build_gpu_wheels.sh. The wheels go into a fresh directory with
#   pip install --no-index --no-deps --target WORK/site gpu_wheels/*.whl
# and WORK/site is put on PYTHONPATH (ahead of site-packages, inherited by every child process), so the
# machine's own Python is left untouched and nothing needs a venv module or network. (Unpacking the wheels
# without pip is the fallback.) With no wheel folder, the packages already installed are used.
#
# Parts, in order, each under `timeout` with its own cap, cut to what is left of the global budget
# (GPU_CHECK_BUDGET_S, default 480 s, i.e. 8 minutes; 15 s are kept for the summary); a part that fails or times
# out is recorded and the next one runs:
#   install 40 s     the wheels into WORK/site
#   env 60 s         env.json
#   data 60 s        the synthetic data set for the training parts (data_pipeline.synthetic)
#   gpu_tests 150 s  python -m pytest -m gpu, except the training-step test: the Triton kernels at N=65,536,
#                    K=131,072, D=256 in bf16 against fp32/fp64 references, attention paths, ...
#   kernel_bench 150 s  python -m benchmarks.codebook_lookup --shapes paper: naive cdist and matmul+argmax, chunked
#                    torch, chunked bf16 matmul and Triton, fwd and fwd+bwd, against the bf16 8192³ matmul peak
#                    measured in the same run, with executed FLOPs and registers/spills per Triton kernel. Its
#                    peak becomes ETT_PEAK_TFLOPS for the training parts (unless already set).
#   gpu_train_test 120 s  python -m pytest -m gpu -k training_step: a bf16 ZeRO-3 training run on CUDA
#   train_ours 200 s python -m benchmarks.train_throughput --config gpu1b --arms ours (3 warm-up, 8 timed steps;
#                    MFU); after an out-of-memory failure it is retried once with micro-batch 2 if 90 s remain
#   train_baseline 180 s  the HF Trainer arm, only if at least 170 s remain
#
# --smoke (or GPU_CHECK_SMOKE=1) runs every part at tiny sizes on the CPU in about a minute: the pytest parts
# collect only, the kernel benchmark runs its smoke shape under TRITON_INTERPRET=1, training runs the tiny config
# for 1 + 2 steps. If the wheel folder holds wheels for another Python (cp312 on a 3.11 CI machine), smoke mode
# checks that they install for Python 3.12 but does not put them on PYTHONPATH.
# Other settings: PYTHON (default python, else python3), GPU_CHECK_WORK (scratch folder, default a new one under
# $TMPDIR), GPU_CHECK_TRAIN_STEPS / GPU_CHECK_TRAIN_WARMUP (8 / 3).
set -uo pipefail # not -e: a failing part is recorded and the next one runs

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO_ROOT" || exit 2

SMOKE="${GPU_CHECK_SMOKE:-0}"
OUT_ARG=""
for arg in "$@"; do
  case "$arg" in
    --smoke) SMOKE=1 ;;
    -h | --help)
      sed -n '2,/^set -uo/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//'
      exit 0
      ;;
    -*)
      echo "gpu_check.sh: unknown option $arg (see --help)" >&2
      exit 2
      ;;
    *) OUT_ARG="$arg" ;;
  esac
done
export GPU_CHECK_SMOKE="$SMOKE"

OUT_DIR="${OUT_ARG:-${OUT:-$REPO_ROOT/runs/gpu_check}}"
mkdir -p "$OUT_DIR" || exit 2
OUT_DIR="$(cd "$OUT_DIR" && pwd)"
if [[ -n "${PYTHON:-}" ]]; then
  :
elif command -v python >/dev/null 2>&1; then
  PYTHON=python
else
  PYTHON=python3
fi
WHEELS="${GPU_CHECK_WHEELS:-$REPO_ROOT/gpu_wheels}"
if [[ "$SMOKE" == 1 ]]; then BUDGET="${GPU_CHECK_BUDGET_S:-300}"; else BUDGET="${GPU_CHECK_BUDGET_S:-480}"; fi
WORK="${GPU_CHECK_WORK:-$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")}"
mkdir -p "$WORK/logs" "$WORK/parts" || exit 2
SITE="$WORK/site"
DATA="$WORK/data"
SUMMARY_RESERVE=15
KILL_AFTER=10
MIN_PART_S=10
START=$(date +%s)
DEADLINE=$((START + BUDGET))
PARTS="$OUT_DIR/parts.jsonl"
: >"$PARTS"
rm -f "$OUT_DIR/env.json" "$OUT_DIR/results.json" "$OUT_DIR/summary.md" "$OUT_DIR/logs.tar.gz"

export PYTHONPATH="$REPO_ROOT${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1
WHEEL_NOTE=""
PEAK_SOURCE="${ETT_PEAK_TFLOPS:+ETT_PEAK_TFLOPS set by the caller}"
CURRENT=""
CHILD=""
CURRENT_T0=0
CURRENT_CAP=0
LAST_LOG=""

report() { "$PYTHON" -m benchmarks.gpu_check_report "$@"; }

write_meta() { # $1: finished (true/false)
  cat >"$WORK/meta.json" <<EOF
{"smoke": $([[ "$SMOKE" == 1 ]] && echo true || echo false), "budget_s": $BUDGET, "start": "$(date -u -d "@$START" +%Y-%m-%dT%H:%M:%SZ)",
 "finished": $1, "wall_s": $(($(date +%s) - START)), "out_dir": "$OUT_DIR", "work": "$WORK",
 "python": "$PYTHON", "wheels": "$WHEEL_NOTE", "peak_source": "$PEAK_SOURCE"}
EOF
}

refresh() { # results.json, summary.md and logs.tar.gz from what has finished so far
  write_meta "${1:-false}"
  timeout 60 "$PYTHON" -m benchmarks.gpu_check_report summary "$OUT_DIR" "$WORK" >>"$WORK/logs/summary.log" 2>&1 ||
    echo "gpu_check: writing the summary failed (see logs/summary.log)" >&2
}

# shellcheck disable=SC2329 # called by the EXIT trap
finish() {
  local rc=$?
  trap - EXIT INT TERM
  if [[ -n "$CHILD" ]] && kill -0 "$CHILD" 2>/dev/null; then # timeout passes the TERM on to the part
    kill -TERM "$CHILD" 2>/dev/null
    for _ in 1 2 3 4 5 6 7 8 9 10; do kill -0 "$CHILD" 2>/dev/null || break; sleep 1; done
    kill -KILL -- "-$CHILD" 2>/dev/null || kill -KILL "$CHILD" 2>/dev/null # timeout leads its own process group
  fi
  if [[ -n "$CURRENT" ]]; then # interrupted inside a part
    report record "$PARTS" --name "$CURRENT" --status interrupted --rc "$rc" --cap "$CURRENT_CAP" \
      --seconds "$(($(date +%s) - CURRENT_T0))" --log "$LAST_LOG" --note "gpu_check.sh was stopped during this part"
  fi
  refresh true
  echo "== gpu_check: $(($(date +%s) - START)) s; results in $OUT_DIR"
  if [[ -f "$OUT_DIR/summary.md" ]]; then
    echo
    cat "$OUT_DIR/summary.md"
  fi
  exit "$rc"
}
trap finish EXIT
trap 'exit 143' TERM
trap 'exit 130' INT

seconds_left() { echo $((DEADLINE - $(date +%s) - SUMMARY_RESERVE)); }

# run_part NAME CAP KIND JSON -- COMMAND...   (KIND: plain, pytest or pytest-collect; JSON: the part's JSON or "")
# Sets PART_STATUS (ok, failed, timeout, skipped).
run_part() {
  local name=$1 cap=$2 kind=$3 json=$4
  shift 5
  local left t0 rc status note="" log="$WORK/logs/$name.log"
  left=$(seconds_left)
  if ((left - KILL_AFTER < MIN_PART_S)); then
    echo "== [$name] skipped: ${left} s left of the budget"
    report record "$PARTS" --name "$name" --status skipped --cap "$cap" --note "no time left (${left} s)"
    PART_STATUS=skipped
    refresh
    return 0
  fi
  if ((cap > left - KILL_AFTER)); then
    cap=$((left - KILL_AFTER))
    note="cap cut to ${cap} s by the budget"
  fi
  echo "== [$name] (cap ${cap} s) $*"
  t0=$(date +%s)
  CURRENT=$name CURRENT_T0=$t0 CURRENT_CAP=$cap LAST_LOG=$log
  # In the background + wait, so that a TERM/INT to this script is handled at once (the trap stops the part).
  timeout --kill-after="$KILL_AFTER" "$cap" "$@" >"$log" 2>&1 </dev/null &
  CHILD=$!
  wait "$CHILD"
  rc=$?
  CHILD=""
  CURRENT=""
  case $rc in
    0) status=ok ;;
    124 | 137) status=timeout ;;
    *) status=failed ;;
  esac
  echo "   [$name] $status (exit $rc) in $(($(date +%s) - t0)) s"
  if [[ $status != ok ]]; then tail -n 5 "$log" | sed 's/^/   | /'; fi
  local extra=()
  [[ -n "$json" ]] && extra+=(--json "$json")
  [[ "$kind" != plain ]] && extra+=(--kind "$kind")
  [[ -n "$note" ]] && extra+=(--note "$note")
  report record "$PARTS" --name "$name" --status "$status" --rc "$rc" --seconds "$(($(date +%s) - t0))" \
    --cap "$cap" --log "$log" "${extra[@]}"
  PART_STATUS=$status
  refresh
}

echo "== gpu_check: $([[ "$SMOKE" == 1 ]] && echo "CPU smoke mode" || echo GPU), budget ${BUDGET} s, output $OUT_DIR, scratch $WORK"

# --- install ------------------------------------------------------------------------------------------------
# shellcheck disable=SC2329 # run as `bash -c install_wheels` (exported), under timeout
install_wheels() { # prints what it did; USE_SITE or CHECK_ONLY on the last line
  shopt -s nullglob
  local wheels=("$WHEELS"/*.whl)
  if ((${#wheels[@]} == 0)); then
    echo "no wheels in $WHEELS: using the installed packages"
    return 0
  fi
  if "$PYTHON" -m pip --version >/dev/null 2>&1; then
    if "$PYTHON" -m pip install --no-index --no-deps --no-compile --disable-pip-version-check --target "$SITE" \
      "${wheels[@]}"; then
      echo "USE_SITE"
      return 0
    fi
    if [[ "$GPU_CHECK_SMOKE" == 1 ]]; then
      echo "not installable for this Python; smoke mode: checking that they install for Python 3.12"
      rm -rf "$SITE.check"
      "$PYTHON" -m pip install --no-index --no-deps --no-compile --disable-pip-version-check --target "$SITE.check" \
        --python-version 3.12 --implementation cp --only-binary=:all: \
        --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 "${wheels[@]}" || return 1
      echo "CHECK_ONLY"
      return 0
    fi
    return 1
  fi
  echo "no pip: unpacking the wheels"
  "$PYTHON" -m benchmarks.gpu_check_report unzip-wheels "$WHEELS" "$SITE" && echo "USE_SITE"
}
export -f install_wheels
export PYTHON WHEELS SITE
run_part install 40 plain "" -- bash -c install_wheels
if [[ $PART_STATUS == ok ]] && grep -q '^USE_SITE$' "$WORK/logs/install.log"; then
  export PYTHONPATH="$REPO_ROOT:$SITE${PYTHONPATH#"$REPO_ROOT"}"
  WHEEL_NOTE="$(find "$WHEELS" -maxdepth 1 -name '*.whl' | wc -l) from $WHEELS installed into $SITE (on PYTHONPATH)"
elif [[ $PART_STATUS == ok ]] && grep -q '^CHECK_ONLY$' "$WORK/logs/install.log"; then
  WHEEL_NOTE="$(find "$WHEELS" -maxdepth 1 -name '*.whl' | wc -l) from $WHEELS install for Python 3.12 (checked; not used by this Python)"
elif [[ $PART_STATUS == ok ]]; then
  WHEEL_NOTE="none in $WHEELS"
else
  WHEEL_NOTE="installing from $WHEELS failed; using the installed packages"
fi

# --- env ----------------------------------------------------------------------------------------------------
run_part env 60 plain "" -- "$PYTHON" -m benchmarks.gpu_check_report env "$OUT_DIR/env.json" --site "$SITE"

# --- data ---------------------------------------------------------------------------------------------------
if [[ "$SMOKE" == 1 ]]; then NUM_TRAIN=120; else NUM_TRAIN=2000; fi
run_part data 60 plain "" -- "$PYTHON" -c "
import os, shutil, sys
from data_pipeline.synthetic import write_synthetic
final, tmp = sys.argv[1], sys.argv[1] + '.partial'
shutil.rmtree(tmp, ignore_errors=True)
write_synthetic(tmp, seed=0, num_train=int(sys.argv[2]), num_eval=8)
os.replace(tmp, final)
" "$DATA" "$NUM_TRAIN"

# --- GPU tests (all but the training-step test) ------------------------------------------------------------
PYTEST=("$PYTHON" -m pytest -p no:cacheprovider --continue-on-collection-errors -m gpu)
if [[ "$SMOKE" == 1 ]]; then
  run_part gpu_tests 150 pytest-collect "$WORK/parts/gpu_tests.json" -- \
    "${PYTEST[@]}" --collect-only -q -k "not training_step"
else
  run_part gpu_tests 150 pytest "$WORK/parts/gpu_tests.json" -- \
    "${PYTEST[@]}" -v -rA -k "not training_step" --junitxml "$WORK/parts/gpu_tests.xml"
fi

# --- kernel benchmark ---------------------------------------------------------------------------------------
if [[ "$SMOKE" == 1 ]]; then
  run_part kernel_bench 150 plain "$WORK/parts/kernel_bench.json" -- env TRITON_INTERPRET=1 \
    "$PYTHON" -m benchmarks.codebook_lookup --shapes smoke --repeats 1 --skip-budget-check \
    --json "$WORK/parts/kernel_bench.json"
else
  run_part kernel_bench 150 plain "$WORK/parts/kernel_bench.json" -- \
    "$PYTHON" -m benchmarks.codebook_lookup --shapes paper --repeats 5 --skip-budget-check \
    --json "$WORK/parts/kernel_bench.json"
fi
if [[ -z "${ETT_PEAK_TFLOPS:-}" && -f "$WORK/parts/kernel_bench.json" ]]; then
  peak=$("$PYTHON" -c "import json,sys; v=json.load(open(sys.argv[1])).get('matmul_tflops'); print(v if v else '')" \
    "$WORK/parts/kernel_bench.json" 2>/dev/null)
  if [[ -n "$peak" ]]; then
    export ETT_PEAK_TFLOPS="$peak"
    PEAK_SOURCE="the matmul peak the kernel benchmark measured in this run, passed as ETT_PEAK_TFLOPS"
    echo "   matmul peak of this run: $peak TFLOP/s (ETT_PEAK_TFLOPS for the training parts)"
  fi
fi

# --- bf16 ZeRO-3 training-step test -------------------------------------------------------------------------
if [[ "$SMOKE" == 1 ]]; then
  run_part gpu_train_test 120 pytest-collect "$WORK/parts/gpu_train_test.json" -- \
    "${PYTEST[@]}" --collect-only -q -k training_step
else
  run_part gpu_train_test 120 pytest "$WORK/parts/gpu_train_test.json" -- \
    "${PYTEST[@]}" -v -rA -k training_step --junitxml "$WORK/parts/gpu_train_test.xml"
fi

# --- training throughput: our trainer, then the HF Trainer baseline if time is left -------------------------
if [[ "$SMOKE" == 1 ]]; then
  TRAIN=(--config tiny --steps 2 --warmup 1)
  BASELINE_MIN_S=30
else
  TRAIN=(--config gpu1b --steps "${GPU_CHECK_TRAIN_STEPS:-8}" --warmup "${GPU_CHECK_TRAIN_WARMUP:-3}")
  BASELINE_MIN_S=170
fi
[[ -d "$DATA/caption_train" ]] && TRAIN+=(--data "$DATA")
OVERRIDES=()
run_part train_ours 200 plain "$WORK/parts/train_ours.json" -- "$PYTHON" -m benchmarks.train_throughput "${TRAIN[@]}" \
  --arms ours --workdir "$WORK/train_ours" --json "$WORK/parts/train_ours.json"
if [[ $PART_STATUS == failed ]] && grep -qE "OutOfMemoryError|CUDA out of memory" "$WORK/logs/train_ours.log" &&
  (($(seconds_left) >= 90)); then
  OVERRIDES=(train.micro_batch_size=2 train.global_batch_size=2)
  run_part train_ours_mb2 200 plain "$WORK/parts/train_ours_mb2.json" -- \
    "$PYTHON" -m benchmarks.train_throughput "${TRAIN[@]}" --arms ours --workdir "$WORK/train_ours_mb2" \
    --json "$WORK/parts/train_ours_mb2.json" "${OVERRIDES[@]}"
fi
left=$(seconds_left)
if ((left >= BASELINE_MIN_S)); then
  run_part train_baseline 180 plain "$WORK/parts/train_baseline.json" -- \
    "$PYTHON" -m benchmarks.train_throughput "${TRAIN[@]}" --arms baseline --workdir "$WORK/train_baseline" \
    --json "$WORK/parts/train_baseline.json" "${OVERRIDES[@]}"
else
  echo "== [train_baseline] skipped: ${left} s left, it needs ${BASELINE_MIN_S} s"
  report record "$PARTS" --name train_baseline --status skipped --cap 180 \
    --note "needs ${BASELINE_MIN_S} s, ${left} s were left"
fi

# The EXIT trap writes the summary. Exit status: 0 when every part that ran succeeded.
failed_parts=$(grep -cvE '"status": "(ok|skipped)"' "$PARTS")
exit $((failed_parts > 0 ? 1 : 0))
