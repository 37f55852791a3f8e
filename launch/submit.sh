#!/usr/bin/env bash
# Submit the pipeline to SLURM (launch/slurm.sbatch).
#
#   launch/submit.sh --nodes 4 --gpus 8 -- +recipe=gdn_50pct model=qwen3_32b \
#       model.path=/shared/Qwen3-32B deepspeed=zero3 output_dir=/shared/runs/q32-gdn50
#
# --gpus N: GPUs per node, one task each. --gpus 0 --tasks-per-node N: N CPU tasks per node
# (DS_ACCELERATOR=cpu, gloo; how the tests run it). --partition, --account, --time, --qos, --signal,
# --cpus-per-task, --output and --job-name go to sbatch. sbatch exports this shell's
# environment to the job (and to a requeued job).
#
# output_dir must be on a file system every node sees: all ranks write to it, and a
# requeued job resumes from its checkpoints.
set -euo pipefail
nodes=1 gpus=8 tasks="" extra=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --nodes) nodes="$2"; shift 2 ;;
    --gpus) gpus="$2"; shift 2 ;;
    --tasks-per-node) tasks="$2"; shift 2 ;;
    --partition|--account|--time|--qos|--cpus-per-task|--output|--job-name|--signal) extra+=("$1=$2"); shift 2 ;;
    --) shift; break ;;
    *) echo "error: unknown option $1 (use -- before pipeline overrides)" >&2; exit 2 ;;
  esac
done
if ! printf '%s\n' "$@" | grep -q '^output_dir='; then
  echo "error: give output_dir=/shared/path: every node and every requeue must see the same run directory" >&2
  exit 2
fi
if [[ $gpus -gt 0 ]]; then
  extra+=("--gpus-per-node=$gpus")
  tasks=${tasks:-$gpus}
elif [[ -z $tasks ]]; then
  echo "error: --gpus 0 needs --tasks-per-node N (CPU tasks)" >&2
  exit 2
fi
here=$(cd "$(dirname "$0")" && pwd)
exec sbatch --nodes "$nodes" --ntasks-per-node "$tasks" "${extra[@]}" "$here/slurm.sbatch" "$@"
