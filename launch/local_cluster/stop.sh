#!/usr/bin/env bash
# Stop the cluster started by launch/local_cluster/start.sh: cancel its jobs, then stop slurmd,
# slurmctld and munged by their pid files. The state directory stays for its logs.
set -uo pipefail
dir=${FACTORY_SLURM_DIR:-/tmp/factory-slurm}
export SLURM_CONF=$dir/slurm.conf
[[ -f $SLURM_CONF ]] || { echo "no local cluster in $dir"; exit 0; }

if command -v squeue >/dev/null && [[ -n $(squeue -h -o %i 2>/dev/null) ]]; then
  scancel --full $(squeue -h -o %i)
  for _ in $(seq 30); do [[ -z $(squeue -h -o %i 2>/dev/null) ]] && break; sleep 0.5; done
fi

stop_pid() {  # name pidfile
  [[ -f $2 ]] || return 0
  local pid
  pid=$(cat "$2")
  if kill -0 "$pid" 2>/dev/null; then
    kill "$pid"
    for _ in $(seq 40); do kill -0 "$pid" 2>/dev/null || break; sleep 0.25; done
    kill -0 "$pid" 2>/dev/null && { echo "$1 ($pid) still running after 10 s: killing"; kill -9 "$pid"; }
  fi
  rm -f "$2"
}
stop_pid slurmd "$dir/slurmd.pid"
stop_pid slurmctld "$dir/slurmctld.pid"
stop_pid munged "$dir/munge/munged.pid"
echo "local SLURM cluster in $dir stopped"
