#!/usr/bin/env bash
# GPU call 1 (2026-12-01, second session): decode GPU test (issue 18) + 8B full-depth distill, both teacher paths (issue 17)
set -u
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 TRITON_CACHE_DIR=/tmp/triton TRITON_CACHE_AUTOTUNING=1
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
mkdir -p /tmp/triton
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; nproc; free -g | head -2
  python3 -c "import torch,triton,transformers,fla,deepspeed,sys;print(sys.version.split()[0],'torch',torch.__version__,'triton',triton.__version__,'transformers',transformers.__version__,'fla',fla.__version__,'deepspeed',deepspeed.__version__)"; } > $OUT/env.txt 2>&1
T0=$(date +%s)
( timeout 240 python3 -m pytest -q tests/gpu/test_static_decode_gpu.py > $OUT/decode_gpu_test.log 2>&1; echo "rc=$? after $(( $(date +%s) - T0 )) s" >> $OUT/decode_gpu_test.log ) &
timeout 320 torchrun --standalone --nproc_per_node 1 bench/bench_zero3_throughput.py --shape 8b --layers 36 --seq-len 8192 \
  --arms distill_shared,distill --steps 3 --warmup 1 --activation-checkpointing --label ac --json $OUT/distill_8b36_ac.json > $OUT/distill_8b36_ac.log 2>&1
echo "ac launch rc=$? at $(( $(date +%s) - T0 )) s" >> $OUT/distill_8b36_ac.log
wait
left=$(( 540 - ($(date +%s) - T0) ))
[ $left -gt 90 ] && timeout $left torchrun --standalone --nproc_per_node 1 bench/bench_zero3_throughput.py --shape 8b --layers 36 --seq-len 8192 \
  --arms distill_shared,distill --steps 3 --warmup 1 --label noac --json $OUT/distill_8b36_noac.json > $OUT/distill_8b36_noac.log 2>&1
echo "noac launch rc=$? at $(( $(date +%s) - T0 )) s" >> $OUT/distill_8b36_noac.log
tail -5 $OUT/*.log
