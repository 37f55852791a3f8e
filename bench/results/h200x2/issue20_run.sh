#!/usr/bin/env bash
# Issue 20 on nvidia-h200-x2, one call: the static-decode GPU test, and the 32B lifecycle on 2 GPUs.
# Run from the checkout's root: bash .snap20/run20.sh   (SHAPE=tiny with DS_ACCELERATOR=cpu: the CPU dry run)
# To fit one call, three things start together: the GPU test (GPU 0, tiny shapes), a one-process
# align step at the 32B shape with 2 layers (GPU 1) that fills the shared Triton cache with fla's
# kernels at the 32B head shapes while the lifecycle's init and load run, and the lifecycle itself.
set -uo pipefail
T0=$(date +%s)
SHAPE=${SHAPE:-32b}
BUDGET=${BUDGET:-515}      # seconds from T0 by which everything has ended
cd "$(dirname "$0")"
: "${OUT:?set OUT}"
mkdir -p "$OUT"
if [ "$SHAPE" = 32b ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
        ../.whl/*.whl || exit 1
    export PYTHONPATH=/tmp/site:$PWD
    SEQ=()
else
    export PYTHONPATH=$PWD
    SEQ=(--seq-len 128)
fi
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export TRITON_CACHE_DIR=/tmp/triton TRITON_CACHE_AUTOTUNING=1
mkdir -p "$TRITON_CACHE_DIR"
{
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
    python3 -c "import deepspeed, fla, torch, triton, transformers; print('torch', torch.__version__, 'triton', \
triton.__version__, 'fla', fla.__version__, 'deepspeed', deepspeed.__version__, 'transformers', \
transformers.__version__, torch.cuda.device_count(), 'GPU(s)')"
    df -h / /tmp /dev/shm; nproc; free -g
} 2>&1 | tee "$OUT/env.log"

# Scratch: the hybrid (~74 GB) and the align checkpoint both stay until the end (resume reads both).
free_gb() { df -BG --output=avail "$1" 2>/dev/null | tail -1 | tr -dc 0-9; }
SCRATCH=/tmp/life
if [ "$SHAPE" = 32b ] && [ "$(free_gb /tmp)" -lt 130 ]; then
    if [ "$(free_gb /dev/shm)" -ge 130 ]; then SCRATCH=/dev/shm/life; fi
fi
echo "scratch $SCRATCH: /tmp has $(free_gb /tmp) GB free, /dev/shm $(free_gb /dev/shm) GB" | tee -a "$OUT/env.log"

if [ "$SHAPE" = 32b ]; then
    CUDA_VISIBLE_DEVICES=1 timeout 400 torchrun --nnodes 1 --nproc_per_node 1 --master_port 29533 \
        bench/bench_zero3_throughput.py --shape 32b --layers 2 --arms align --steps 1 --warmup 0 \
        --activation-checkpointing > "$OUT/warm.log" 2>&1 &
    WARM=$!
    CUDA_VISIBLE_DEVICES=0 timeout 150 python3 -m pytest -q tests/gpu/test_static_decode_gpu.py > "$OUT/pytest.log" 2>&1 &
    TEST=$!
fi

LEFT=$((BUDGET - ($(date +%s) - T0)))
echo "lifecycle starts $(( $(date +%s) - T0 )) s in, limit $LEFT s"
timeout "$LEFT" torchrun --standalone --nproc_per_node 2 bench/bench_zero3_lifecycle.py --shape "$SHAPE" \
    --activation-checkpointing --steps 1 "${SEQ[@]}" --scratch "$SCRATCH" --json "$OUT/life_$SHAPE.json" 2>&1 \
    | tee "$OUT/lifecycle_$SHAPE.log"
echo "lifecycle exited with ${PIPESTATUS[0]} at $(( $(date +%s) - T0 )) s"
if [ "$SHAPE" = 32b ]; then
    wait "$TEST"; echo "pytest exited with $?"; cat "$OUT/pytest.log"
    kill "$WARM" 2>/dev/null; wait "$WARM"; echo "warm-up exited with $?"; tail -5 "$OUT/warm.log"
fi
rm -rf "$SCRATCH"
df -h /tmp | tail -1
echo "done at $(( $(date +%s) - T0 )) s"
