#!/usr/bin/env bash
# Issue 5, GPU part: align / distill / baseline throughput under ZeRO-3 on 1, 2 and 4 GPUs of one
# host (one torchrun launch per GPU count, all arms in each), then one merged table (--report).
#
# Wheels to carry in .whl/ (the GPU image lacks them); what this benchmark imports, and why:
#   deepspeed==0.19.8                 ZeRO-3 (PyPI has only the sdist: built here with
#                                     DS_BUILD_OPS=0 pip wheel --no-deps; py3-none-any)
#   hjson==3.1.0, pydantic==2.13.4, pydantic-core==2.46.4 (cp312 manylinux), annotated-types==0.7.0,
#   typing-inspection==0.4.2          deepspeed's imports
#   typing-extensions==4.16.0         pydantic needs >= 4.14.1; carried in case the image's is older
#   omegaconf==2.3.1, antlr4-python3-runtime==4.9.3
#                                     factory.config (imported by every stage module) imports omegaconf
#   flash-linear-attention==0.6.0, fla-core==0.6.0
#                                     GDN kernels on CUDA
# Not imported on this path, so not needed here: hydra-core, datasets, dill, multiprocess.
# The image has the rest (torch, transformers, triton, accelerate, msgpack, ninja, einops, psutil, ...).
#
# Usage, from the repo root with $OUT set (extra arguments go to every launch):
#   bash bench/run_zero3_scaling.sh                       # 8b shape, 8 layers, 8K rows, 1 2 4 GPUs
#   GPUS=1 bash bench/run_zero3_scaling.sh                # one GPU count per call (a call's time limit)
#   GPUS="4 8" RESULTS=outputs/zero3-32b bash bench/run_zero3_scaling.sh --shape 32b --activation-checkpointing
# Results: $RESULTS/zero3_<N>gpu.json (kept on a warm machine between calls, so a later call's report
# merges earlier launches), copied to $OUT with each launch's log and the merged table.
set -uo pipefail
cd "$(dirname "$0")/.."
: "${OUT:?set OUT to the folder that receives the results}"
GPUS=${GPUS:-"1 2 4"}
RESULTS=${RESULTS:-outputs/zero3}
LAUNCH_TIMEOUT=${LAUNCH_TIMEOUT:-0}  # seconds per launch; 0: none

python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
# NVLink multicast stays off on these machines (it can take a shared host's GPUs down).
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
# One Triton cache for every launch: only the first pays fla's JIT compile (minutes per process).
export TRITON_CACHE_DIR=${TRITON_CACHE_DIR:-$PWD/outputs/triton-cache}
mkdir -p "$TRITON_CACHE_DIR" "$RESULTS" "$OUT"
python3 -c "import deepspeed, fla, omegaconf, pydantic, torch; print('deepspeed', deepspeed.__version__, 'fla', \
fla.__version__, 'torch', torch.__version__, torch.cuda.device_count(), 'GPU(s)')" || exit 1

for n in $GPUS; do
    json="$RESULTS/zero3_${n}gpu.json"
    rm -f "$json"
    CUDA_VISIBLE_DEVICES=$(seq -s, 0 $((n - 1))) timeout "$LAUNCH_TIMEOUT" torchrun --standalone --nproc_per_node "$n" \
        bench/bench_zero3_throughput.py --label "${n}gpu" --json "$json" "$@" 2>&1 | tee "$OUT/zero3_${n}gpu.log"
    echo "launch on $n GPU(s) exited with ${PIPESTATUS[0]}"
    [ -f "$json" ] && cp "$json" "$OUT/"
done

shopt -s nullglob
runs=("$RESULTS"/zero3_*gpu.json)
[ ${#runs[@]} -gt 0 ] || { echo "no results to merge"; exit 1; }
python3 bench/bench_zero3_throughput.py --report "${runs[@]}" --json "$OUT/zero3_scaling.json" \
    | tee "$OUT/zero3_scaling.md"
