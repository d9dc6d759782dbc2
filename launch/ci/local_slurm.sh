#!/usr/bin/env bash
# A real two-node SLURM cluster on one machine, for CI and for trying the sbatch scripts locally.
#
#   bash launch/ci/local_slurm.sh start    # install (only when missing), configure, start, wait for 2 idle nodes
#   bash launch/ci/local_slurm.sh status   # daemons and sinfo
#   bash launch/ci/local_slurm.sh stop     # stop every daemon by pid file, restore /etc/hosts
#
# Layout: munged, slurmctld and two slurmd daemons (nodes n1 and n2) all on 127.0.0.1, the two slurmd on
# different ports (Debian's build supports several slurmd per host). n1/n2 are added to /etc/hosts so that
# MASTER_ADDR=n1 resolves; the line is removed at stop. Needs root. Jobs run as root and inherit the submitting
# environment (PATH, PYTHONPATH), so they run the same python as the caller.
set -euo pipefail

CONF_DIR=/etc/slurm
CONF=$CONF_DIR/slurm.conf
RUN_DIR=/run/ett-local-slurm
LOG_DIR=/var/log/slurm
SPOOL_CTLD=/var/spool/slurmctld
SPOOL_D=/var/spool/slurmd
HOSTS_MARKER="# ett-local-slurm"
NODES=(n1 n2)
WAIT_S=${LOCAL_SLURM_WAIT_S:-60}

log() { echo "[local_slurm] $*"; }

require_root() {
  if [ "$(id -u)" != 0 ]; then
    echo "[local_slurm] must run as root (it installs packages, writes $CONF and starts daemons)" >&2
    exit 1
  fi
}

install_packages() {
  local missing=()
  command -v slurmctld >/dev/null || missing+=(slurmctld)
  command -v slurmd >/dev/null || missing+=(slurmd)
  command -v sbatch >/dev/null || missing+=(slurm-client)
  [ -x /usr/sbin/munged ] || missing+=(munge)
  if [ ${#missing[@]} -eq 0 ]; then
    return
  fi
  log "installing ${missing[*]}"
  apt-get update -q
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends slurmctld slurmd slurm-client munge
}

port_free() { ! (echo >"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

# Prints the first free TCP port >= $1 on loopback that is not in the rest of the arguments.
free_port() {
  local p=$1
  shift
  while ! port_free "$p" || [[ " $* " == *" $p "* ]]; do
    p=$((p + 1))
  done
  echo "$p"
}

pid_alive() { [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

all_running() {
  pid_alive /run/munge/munged.pid && pid_alive "$RUN_DIR/slurmctld.pid" &&
    pid_alive "$RUN_DIR/slurmd-n1.pid" && pid_alive "$RUN_DIR/slurmd-n2.pid"
}

idle_nodes() { sinfo -h -N -t idle -o %N 2>/dev/null | sort -u | wc -l; }

write_conf() {
  local ctld_port n1_port n2_port
  ctld_port=$(free_port 16817)
  n1_port=$(free_port 17001 "$ctld_port")
  n2_port=$(free_port $((n1_port + 1)) "$ctld_port" "$n1_port")
  mkdir -p "$CONF_DIR" "$RUN_DIR" "$LOG_DIR" "$SPOOL_CTLD" "$SPOOL_D"
  cat >"$CONF" <<EOF
# Written by launch/ci/local_slurm.sh: two nodes (n1, n2) served by two slurmd on 127.0.0.1.
ClusterName=ettci
SlurmctldHost=localhost
SlurmctldPort=$ctld_port
SlurmUser=root
AuthType=auth/munge
CredType=cred/munge
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
StateSaveLocation=$SPOOL_CTLD
SlurmctldPidFile=$RUN_DIR/slurmctld.pid
SlurmctldLogFile=$LOG_DIR/slurmctld.log
SlurmdSpoolDir=$SPOOL_D/%n
SlurmdPidFile=$RUN_DIR/slurmd-%n.pid
SlurmdLogFile=$LOG_DIR/slurmd-%n.log
KillWait=10
MinJobAge=600
NodeName=n1 NodeHostname=$(hostname) NodeAddr=127.0.0.1 Port=$n1_port CPUs=$(nproc) RealMemory=2000
NodeName=n2 NodeHostname=$(hostname) NodeAddr=127.0.0.1 Port=$n2_port CPUs=$(nproc) RealMemory=2000
PartitionName=debug Nodes=n1,n2 Default=YES MaxTime=INFINITE State=UP
EOF
  log "wrote $CONF (slurmctld :$ctld_port, n1 :$n1_port, n2 :$n2_port)"
}

add_hosts() {
  if ! grep -q "$HOSTS_MARKER" /etc/hosts; then
    echo "127.0.0.1 ${NODES[*]} $HOSTS_MARKER" >>/etc/hosts
  fi
}

remove_hosts() {
  if grep -q "$HOSTS_MARKER" /etc/hosts; then
    # /etc/hosts may be a bind mount: rewrite it in place instead of replacing the file (sed -i).
    local kept
    kept=$(grep -v "$HOSTS_MARKER" /etc/hosts)
    printf '%s\n' "$kept" >/etc/hosts
  fi
}

print_logs() {
  echo "---- sinfo" >&2
  sinfo -N -l >&2 || true
  for f in "$LOG_DIR"/slurmctld.log "$LOG_DIR"/slurmd-n1.log "$LOG_DIR"/slurmd-n2.log; do
    echo "---- tail $f" >&2
    tail -n 30 "$f" >&2 || true
  done
}

start() {
  require_root
  if all_running && [ "$(idle_nodes)" -ge 2 ]; then
    log "already running"
    sinfo -N
    return
  fi
  stop_daemons
  install_packages
  write_conf
  add_hosts
  install -d -o munge -g munge -m 0755 /run/munge
  runuser -u munge -- /usr/sbin/munged
  /usr/sbin/slurmctld
  for n in "${NODES[@]}"; do
    /usr/sbin/slurmd -N "$n"
  done
  local waited=0
  while [ "$(idle_nodes)" -lt 2 ]; do
    if [ "$waited" -ge $((WAIT_S * 10)) ]; then
      echo "[local_slurm] the nodes did not become idle within ${WAIT_S}s" >&2
      print_logs
      exit 1
    fi
    # A node left DOWN by an earlier unclean stop returns to service on request.
    if [ $((waited % 20)) = 19 ]; then
      scontrol update NodeName=n1,n2 State=RESUME 2>/dev/null || true
    fi
    sleep 0.1
    waited=$((waited + 1))
  done
  log "up"
  sinfo -N
}

stop_pid() {
  local pidfile=$1
  if ! pid_alive "$pidfile"; then
    rm -f "$pidfile"
    return
  fi
  local pid
  pid=$(cat "$pidfile")
  kill "$pid"
  for _ in $(seq 1 300); do
    kill -0 "$pid" 2>/dev/null || break
    sleep 0.1
  done
  if kill -0 "$pid" 2>/dev/null; then
    log "pid $pid ($pidfile) did not stop in 30 s; sending SIGKILL"
    kill -9 "$pid" || true
  fi
  rm -f "$pidfile"
}

stop_daemons() {
  stop_pid "$RUN_DIR/slurmd-n1.pid"
  stop_pid "$RUN_DIR/slurmd-n2.pid"
  stop_pid "$RUN_DIR/slurmctld.pid"
  stop_pid /run/munge/munged.pid
}

stop() {
  require_root
  stop_daemons
  remove_hosts
  log "stopped"
}

status() {
  for f in /run/munge/munged.pid "$RUN_DIR"/slurmctld.pid "$RUN_DIR"/slurmd-n1.pid "$RUN_DIR"/slurmd-n2.pid; do
    if pid_alive "$f"; then echo "running  $f ($(cat "$f"))"; else echo "stopped  $f"; fi
  done
  if command -v sinfo >/dev/null && all_running; then sinfo -N; fi
}

case "${1:-}" in
  start) start ;;
  stop) stop ;;
  status) status ;;
  *)
    echo "usage: $0 start|stop|status" >&2
    exit 2
    ;;
esac
