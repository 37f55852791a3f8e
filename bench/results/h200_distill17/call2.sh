#!/usr/bin/env bash
# GPU call 2: Qwen3-32B shape distill on one H200, shared teacher, ZeRO-3 + optimizer offloaded to CPU (issue 17)
set -u
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 TRITON_CACHE_DIR=/tmp/triton TRITON_CACHE_AUTOTUNING=1
T0=$(date +%s)
( while sleep 5; do echo "$(( $(date +%s) - T0 )) s $(free -m | awk '/Mem:/{print $3}') MiB used $(nvidia-smi --query-gpu=memory.used --format=csv,noheader)"; done > $OUT/mem_32b.log ) &
timeout 560 torchrun --standalone --nproc_per_node 1 bench/bench_zero3_throughput.py --shape 32b --seq-len 8192 \
  --arms distill_shared --steps 2 --warmup 1 --activation-checkpointing --offload-optimizer --label 32b_offload \
  --json $OUT/distill_32b_offload.json > $OUT/distill_32b_offload.log 2>&1
echo "rc=$? at $(( $(date +%s) - T0 )) s" >> $OUT/distill_32b_offload.log
