#!/usr/bin/env bash
# One node, N processes (GPUs, or CPU processes over gloo for development), with the deepspeed launcher.
#
#   bash launch/local.sh N [MODULE] [ARGS...]
#   bash launch/local.sh 8 training.train --config examples/stage2_ett.yaml --resume auto
#   bash launch/local.sh 2 launch.check_dist
#
# MODULE defaults to training.train. ETT_LAUNCHER=torchrun uses torchrun instead. ETT_LOG_DIR (default
# logs/local-<time>) receives the hostfile and one log per rank. Exit code: the first failing rank's (75: preempted,
# saved; run again with --resume auto).
set -euo pipefail

if [ $# -lt 1 ] || ! [[ "$1" =~ ^[1-9][0-9]*$ ]]; then
  echo "usage: bash launch/local.sh NUM_PROCESSES [MODULE] [ARGS...]   (NUM_PROCESSES: a positive integer, got '${1:-}')" >&2
  exit 2
fi
NPROC=$1
shift
MODULE=training.train
if [ $# -gt 0 ] && [[ "$1" != -* ]]; then
  MODULE=$1
  shift
fi
ETT_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PYTHON=${ETT_PYTHON:-python3}
LAUNCHER=${ETT_LAUNCHER:-deepspeed}
LOG_DIR=${ETT_LOG_DIR:-logs/local-$(date +%Y%m%d-%H%M%S)}
export PYTHONPATH="$ETT_ROOT${PYTHONPATH:+:$PYTHONPATH}"
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
export LOCAL_WORLD_SIZE=$NPROC

if "$PYTHON" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
  GPUS=$("$PYTHON" -c "import torch; print(torch.cuda.device_count())")
  if [ "$NPROC" -gt "$GPUS" ]; then
    echo "local.sh: $NPROC processes requested but this node has $GPUS GPUs" >&2
    exit 2
  fi
fi

MASTER_PORT=${MASTER_PORT:-$("$PYTHON" -c "import socket; s = socket.socket(); s.bind(('127.0.0.1', 0)); print(s.getsockname()[1])")}
mkdir -p "$LOG_DIR"
case "$LAUNCHER" in
  deepspeed)
    echo "localhost slots=$NPROC" >"$LOG_DIR/hostfile"
    exec "$PYTHON" -u -m deepspeed.launcher.runner --hostfile "$LOG_DIR/hostfile" --no_ssh --node_rank=0 \
      --master_addr=127.0.0.1 --master_port="$MASTER_PORT" --enable_each_rank_log="$LOG_DIR/ranks" \
      --module "$MODULE" "$@"
    ;;
  torchrun)
    exec "$PYTHON" -u -m torch.distributed.run --nnodes=1 --nproc-per-node="$NPROC" \
      --master-addr=127.0.0.1 --master-port="$MASTER_PORT" --log-dir="$LOG_DIR/ranks" --tee=3 \
      -m "$MODULE" "$@"
    ;;
  *)
    echo "local.sh: ETT_LAUNCHER must be deepspeed or torchrun, got '$LAUNCHER'" >&2
    exit 2
    ;;
esac
