#!/usr/bin/env bash
# Build the wheel folder that benchmarks/gpu_check.sh installs on a bare GPU machine without network.
#
#   benchmarks/build_gpu_wheels.sh [DIR]          (default DIR: gpu_wheels/ at the repository root, gitignored)
#
# Runs on any Linux machine with network and pip (CPU only; nothing is compiled for the GPU). The target is one
# x86_64 H100/H200 machine with Python 3.12 that already has torch, triton, transformers, accelerate, pyarrow,
# sentencepiece, safetensors, tensorboard, matplotlib and pytest (and so numpy, packaging, psutil, tqdm, pyyaml,
# python-dateutil, huggingface-hub, filelock and fsspec, which those depend on). The folder holds what the project
# needs beyond that, every wheel without its dependencies (gpu_check.sh installs them with --no-deps):
#   - deepspeed 0.19.8 built as a pure-python wheel (DS_BUILD_OPS=0: no compiled ops; ZeRO-3 with torch's AdamW
#     loads none), plus its requirements pydantic, pydantic-core (cp312), annotated-types, typing-inspection,
#     typing-extensions, hjson, py-cpuinfo, einops, msgpack (cp312), ninja and psutil;
#   - simplejpeg (cp312), the data pipeline's JPEG decoder;
#   - datasets and what it needs beyond the list above: dill, multiprocess, xxhash (cp312), pandas (cp312; about
#     12 MB of the folder's ~24 MB). GPU_WHEELS_DATASETS=0 leaves them out: only tests/test_data_convert.py uses
#     datasets, and no GPU test does.
# Versions are pinned to the ones the CPU CI runs with. Extra requirement specifiers can be added with
# GPU_WHEELS_EXTRA="scipy==1.17.1 ..." (binary, cp312). The target's Python version and platform can be changed
# with GPU_WHEELS_PYTHON (3.12) and GPU_WHEELS_PLATFORMS ("manylinux_2_28_x86_64 manylinux2014_x86_64").
# The folder gets a MANIFEST.txt (file, bytes, sha256). The whole folder travels with the repository to the GPU
# machine, so keep it small (the device tool carries at most 64 MiB).
set -euo pipefail

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DIR="${1:-$REPO_ROOT/gpu_wheels}"
PYTHON="${PYTHON:-python3}"
TARGET_PY="${GPU_WHEELS_PYTHON:-3.12}"
read -r -a PLATFORMS <<<"${GPU_WHEELS_PLATFORMS:-manylinux_2_28_x86_64 manylinux2014_x86_64}"

# Pure-python wheels (py3-none-any), any Python version.
PURE=(
  pydantic==2.14.4
  annotated-types==0.8.0
  typing-inspection==0.4.5
  typing-extensions==4.16.0
  hjson==3.1.0
  py-cpuinfo==9.0.0
  einops==0.8.2
)
# Compiled wheels for the target (cp312 or abi3 manylinux).
BINARY=(
  pydantic-core==2.50.5
  msgpack==1.2.4
  ninja==1.13.2
  psutil==7.2.2
  simplejpeg==1.9.0
)
if [[ "${GPU_WHEELS_DATASETS:-1}" != 0 ]]; then
  PURE+=(datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19)
  BINARY+=(xxhash==4.1.0 pandas==3.1.1)
fi
read -r -a EXTRA <<<"${GPU_WHEELS_EXTRA:-}"
BINARY+=("${EXTRA[@]}")

mkdir -p "$DIR"
DIR="$(cd "$DIR" && pwd)"
start=$SECONDS
echo "== building $DIR for Python $TARGET_PY on ${PLATFORMS[*]}"

# deepspeed: pip builds the sdist (or reuses a cached build); DS_BUILD_OPS=0 keeps every op out of the wheel.
DS_BUILD_OPS=0 "$PYTHON" -m pip wheel --quiet --no-deps --wheel-dir "$DIR" deepspeed==0.19.8
ds_wheel=("$DIR"/deepspeed-0.19.8-*.whl)
case "${ds_wheel[0]}" in
  *-py3-none-any.whl) ;;
  *) echo "deepspeed was not built as a pure-python wheel: ${ds_wheel[*]}" >&2; exit 1 ;;
esac

platform_args=()
for p in "${PLATFORMS[@]}"; do platform_args+=(--platform "$p"); done
target_args=(--only-binary=:all: --no-deps --python-version "$TARGET_PY" --implementation cp "${platform_args[@]}")

"$PYTHON" -m pip download --quiet "${target_args[@]}" --dest "$DIR" "${PURE[@]}"
"$PYTHON" -m pip download --quiet "${target_args[@]}" --dest "$DIR" "${BINARY[@]}"

# Anything pip fetched that is not a wheel would need building on the target: refuse it.
shopt -s nullglob
others=()
for f in "$DIR"/*; do
  case "$f" in *.whl | */MANIFEST.txt) ;; *) others+=("$f") ;; esac
done
if ((${#others[@]})); then
  echo "not wheels (remove them): ${others[*]}" >&2
  exit 1
fi

(
  cd "$DIR"
  for f in *.whl; do printf '%s %s %s\n' "$f" "$(stat -c %s "$f")" "$(sha256sum "$f" | cut -d' ' -f1)"; done
) >"$DIR/MANIFEST.txt"
echo "== $(find "$DIR" -maxdepth 1 -name "*.whl" | wc -l) wheels, $(du -sh "$DIR" | cut -f1), in $((SECONDS - start)) s:"
cut -d' ' -f1,2 "$DIR/MANIFEST.txt"
