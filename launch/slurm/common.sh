# Sourced by launch/slurm/*.sbatch (not run on its own). Runs one python module on every node of the job through
# the deepspeed launcher (or torchrun), forwards the preemption signal, and requeues the job on exit code 75.
#
# Settings (environment variables, all optional):
#   ETT_ROOT            repository root (default: the directory sbatch was called from)
#   ETT_PYTHON          python interpreter (default: python3 on PATH)
#   ETT_MODULE          module to run (default set by the calling sbatch script)
#   ETT_LAUNCHER        deepspeed | torchrun (default set by the calling sbatch script)
#   ETT_PROCS_PER_NODE  processes per node = hostfile slots (default: GPUs allocated per node, or 1 without GPUs)
#   ETT_LOG_DIR         job logs: hostfile, deepspeed_env, one log per rank (default: $ETT_ROOT/logs/slurm-$SLURM_JOB_ID)
#   ETT_REQUEUE_ARGS    arguments appended when the job runs again after a requeue (default: --resume auto)
#   ETT_MAX_REQUEUES    stop requeueing after this many restarts (default: 20)
#   NCCL_*, TORCH_NCCL_*, FI_*, UCX_*  and the lines of .deepspeed_env (in ~ or the working directory) reach every rank.
set -euo pipefail

PREEMPTED_EXIT_CODE=75
ETT_ROOT=${ETT_ROOT:-${SLURM_SUBMIT_DIR:-$PWD}}
cd "$ETT_ROOT"
PYTHON=${ETT_PYTHON:-python3}
ETT_LOG_DIR=${ETT_LOG_DIR:-$ETT_ROOT/logs/slurm-$SLURM_JOB_ID}
PROCS_PER_NODE=${ETT_PROCS_PER_NODE:-${SLURM_GPUS_ON_NODE:-1}}
RESTARTS=${SLURM_RESTART_COUNT:-0}
export PYTHONPATH="$ETT_ROOT${PYTHONPATH:+:$PYTHONPATH}"
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
mkdir -p "$ETT_LOG_DIR"

echo "[ett] job $SLURM_JOB_ID (restart $RESTARTS) nodes=$SLURM_JOB_NODELIST procs/node=$PROCS_PER_NODE" \
  "launcher=$ETT_LAUNCHER module=$ETT_MODULE python=$(command -v "$PYTHON")"

# Hostfile (scontrol show hostnames, slots = procs per node) and MASTER_ADDR / MASTER_PORT (first host, free port
# derived from the job id).
HOSTFILE=$ETT_LOG_DIR/hostfile
exports=$("$PYTHON" -m launch.slurm prepare --hostfile "$HOSTFILE" --slots "$PROCS_PER_NODE")
eval "$exports"
export MASTER_ADDR MASTER_PORT
export LOCAL_WORLD_SIZE=$PROCS_PER_NODE

# Communication settings: the user's .deepspeed_env (~ then the working directory, as DeepSpeed reads it) plus
# NCCL_* / TORCH_NCCL_* / FI_* / UCX_* from the submitting environment, merged into one file. DeepSpeed's --no_ssh
# mode does not read .deepspeed_env itself, so the lines are also exported here; srun passes them to every node.
DS_ENV=$ETT_LOG_DIR/deepspeed_env
: >"$DS_ENV"
for f in "$HOME/.deepspeed_env" "$ETT_ROOT/.deepspeed_env"; do
  if [ -f "$f" ]; then grep -E '^[A-Za-z_][A-Za-z0-9_]*=' "$f" >>"$DS_ENV" || true; fi
done
env | grep -E '^(NCCL_|TORCH_NCCL_|FI_|UCX_)' >>"$DS_ENV" || true
while IFS='=' read -r key value; do
  export "$key=$value"
done <"$DS_ENV"
export DS_ENV_FILE=$DS_ENV

args=("$@")
if [ "$RESTARTS" -gt 0 ] && [ -n "${ETT_REQUEUE_ARGS-"--resume auto"}" ]; then
  read -r -a requeue_args <<<"${ETT_REQUEUE_ARGS-"--resume auto"}"
  args+=("${requeue_args[@]}")
fi

# Preemption: `#SBATCH --signal=B:USR1@120` signals this shell only; forward USR1 to every process of the job
# steps. The launcher processes ignore it (launch.slurm node), the trainer saves and exits with 75.
preempted=0
forward_preemption() {
  preempted=1
  echo "[ett] $(date +%T) preemption signal: forwarding SIGUSR1 to the job steps"
  scancel --signal=USR1 "$SLURM_JOB_ID" || true
}
trap forward_preemption USR1 TERM

srun --ntasks-per-node=1 --kill-on-bad-exit=0 \
  "$PYTHON" -u -m launch.slurm node --hostfile "$HOSTFILE" --launcher "$ETT_LAUNCHER" \
  --rank-log-dir "$ETT_LOG_DIR/ranks" -- "$ETT_MODULE" "${args[@]}" &
srun_pid=$!
while true; do
  set +e
  wait "$srun_pid"
  rc=$?
  set -e
  kill -0 "$srun_pid" 2>/dev/null || break
done
echo "[ett] $(date +%T) launcher exit code $rc"

# torchrun reports a worker's exit code 75 as 1, so after a forwarded preemption any failure counts as preempted.
if [ "$rc" = "$PREEMPTED_EXIT_CODE" ] || { [ "$preempted" = 1 ] && [ "$rc" != 0 ] && [ "$ETT_LAUNCHER" = torchrun ]; }; then
  if [ "$RESTARTS" -ge "${ETT_MAX_REQUEUES:-20}" ]; then
    echo "[ett] preempted, but the job already ran $RESTARTS times (ETT_MAX_REQUEUES): not requeueing" >&2
    exit "$PREEMPTED_EXIT_CODE"
  fi
  echo "[ett] preempted and saved: requeueing job $SLURM_JOB_ID (the next run resumes with ${ETT_REQUEUE_ARGS-"--resume auto"})"
  trap - USR1 TERM
  scontrol requeue "$SLURM_JOB_ID"
  exit 0
fi
exit "$rc"
