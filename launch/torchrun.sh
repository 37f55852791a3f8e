#!/usr/bin/env bash
# Launch the priming pipeline with torchrun on one node or several.
#
#   One node, 8 GPUs:
#     launch/torchrun.sh --nproc 8 -- +recipe=gdn_50pct model=qwen3_8b deepspeed=zero3
#   Four nodes x 8 GPUs (run the same command on every node, NODE_RANK=0..3):
#     MASTER_ADDR=node0 NODE_RANK=$i launch/torchrun.sh --nnodes 4 --nproc 8 -- +recipe=gdn_50pct \
#       model=qwen3_32b model.path=/shared/Qwen3-32B deepspeed=zero3 output_dir=/shared/runs/q32
#
# Every rank composes the same config and writes to the one output_dir (a shared file system).
# The launcher starts processes; it never trains.
set -euo pipefail
nnodes=1 nproc=1
while [[ $# -gt 0 ]]; do
  case "$1" in
    --nnodes) nnodes="$2"; shift 2 ;;
    --nproc) nproc="$2"; shift 2 ;;
    --) shift; break ;;
    *) echo "error: unknown option $1 (use -- before pipeline overrides)" >&2; exit 2 ;;
  esac
done
exec torchrun --nnodes "$nnodes" --nproc_per_node "$nproc" \
  --node_rank "${NODE_RANK:-0}" --master_addr "${MASTER_ADDR:-127.0.0.1}" --master_port "${MASTER_PORT:-29500}" \
  -m factory.prime "$@"
