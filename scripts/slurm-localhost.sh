#!/usr/bin/env bash
# A single-node SLURM on this machine, for tests of profiles/slurm (tests/test_slurm.py) and CI.
# Debian/Ubuntu, as root, no systemd needed: the daemons are started and stopped by hand.
#
#   scripts/slurm-localhost.sh install   apt-get slurm-wlm and munge (skipped when installed)
#   scripts/slurm-localhost.sh start     write slurm.conf, start munged, slurmctld, slurmd; wait
#                                        until the node is idle (does nothing if already running)
#   scripts/slurm-localhost.sh stop      cancel all jobs, stop the daemons by their PID files
#   scripts/slurm-localhost.sh status    exit 0 if all three daemons run
#
# No slurmdbd: `sacct` does not work, so Snakemake must poll with `squeue`; MinJobAge=3600 keeps
# finished jobs visible to squeue and `scontrol show job` for an hour. The node offers two
# stand-in GPUs (GRES backed by /dev/null and /dev/zero; slurmd drops GPUs without a device file):
# jobs that request a GPU are scheduled as on a cluster, find no CUDA device and run on the CPU.
set -euo pipefail
NODE=$(hostname -s)  # slurmd finds its NodeName line by the short host name
LOG=/var/log/slurm
PIDS=(/run/slurm/slurmd.pid /run/slurm/slurmctld.pid /run/munge/munged.pid)  # stop order
MEM=$(awk '/MemTotal/ {print int($2 / 1024 * 0.85)}' /proc/meminfo)

running() { [ -s "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }
wait_for() {
  for _ in $(seq 120); do bash -c "$1" &>/dev/null && return; sleep 0.5; done
  echo "slurm-localhost: timed out waiting for: $1" >&2; return 1
}

write_conf() {
  mkdir -p /etc/slurm /run/slurm /var/lib/slurm/slurmctld /var/lib/slurm/slurmd "$LOG"
  cat > /etc/slurm/slurm.conf <<EOF
ClusterName=localhost
SlurmctldHost=$NODE(127.0.0.1)
SlurmUser=root
AuthType=auth/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
ReturnToService=2
MinJobAge=3600
StateSaveLocation=/var/lib/slurm/slurmctld
SlurmdSpoolDir=/var/lib/slurm/slurmd
SlurmctldPidFile=/run/slurm/slurmctld.pid
SlurmdPidFile=/run/slurm/slurmd.pid
SlurmctldLogFile=$LOG/slurmctld.log
SlurmdLogFile=$LOG/slurmd.log
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/filetxt
JobCompLoc=$LOG/jobcomp.log
GresTypes=gpu
NodeName=$NODE NodeAddr=127.0.0.1 CPUs=$(nproc) RealMemory=$MEM Gres=gpu:2 State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP DefMemPerCPU=1000
EOF
  printf "NodeName=$NODE Name=gpu File=%s\n" /dev/null /dev/zero > /etc/slurm/gres.conf
}

case "${1:-}" in
install)
  if [ -x /usr/sbin/slurmctld ] && [ -x /usr/sbin/slurmd ] && [ -x /usr/sbin/munged ]; then
    echo "slurm-localhost: slurm-wlm and munge already installed"; exit 0
  fi
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends slurm-wlm munge >/dev/null ;;
start)
  [ -s /etc/munge/munge.key ] || mungekey --create --force
  chown munge:munge /etc/munge/munge.key && chmod 0400 /etc/munge/munge.key
  install -d -o munge -g munge -m 0755 /run/munge
  running /run/munge/munged.pid || runuser -u munge -- /usr/sbin/munged
  wait_for "munge -n | unmunge"
  if ! running /run/slurm/slurmctld.pid; then write_conf; /usr/sbin/slurmctld -c; fi  # -c: no old state
  running /run/slurm/slurmd.pid || /usr/sbin/slurmd
  wait_for "sinfo -h -o %T | grep -qxE 'idle|mixed|allocated'"  # up (busy if already running)
  sinfo ;;
stop)
  if running /run/slurm/slurmctld.pid; then  # cancel leftover jobs, or their processes outlive slurmd
    scancel --partition=debug || true
    wait_for "[ -z \"\$(squeue -h -t R,CG)\" ]" || true
  fi
  for pidfile in "${PIDS[@]}"; do
    running "$pidfile" || continue
    pid=$(cat "$pidfile"); kill "$pid"
    for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
  done
  # start writes the config anew. Without it, `scontrol` fails at once; with it and no slurmctld,
  # it retries for 9 s, and the SLURM executor plugin calls it each time Snakemake starts.
  rm -f /etc/slurm/slurm.conf /etc/slurm/gres.conf ;;
status)
  for pidfile in "${PIDS[@]}"; do running "$pidfile" || exit 1; done ;;
*)
  echo "usage: $0 install|start|stop|status" >&2; exit 2 ;;
esac
