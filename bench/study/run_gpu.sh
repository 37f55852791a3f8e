#!/usr/bin/env bash
# Issue 15's levers study on one GPU, in one `run` call: the arms run in parallel processes on the
# one GPU (--workers, one CPU thread each), the results land in $OUT after every arm, and no arm
# starts that would not end before the deadline (judged by the slowest arm so far); arms still
# running at the deadline are stopped, and the report is drawn from what ended.
#
# Usage, from the repo root with $OUT set and .whl carried (extra arguments go to run_study.py):
#   DEADLINE_S=520 bash bench/study/run_gpu.sh --align-steps 150 --distill-steps 100
#   DEADLINE_S=520 WORKERS=8 bash bench/study/run_gpu.sh --arms r50 --seeds 0          # a subset
#   DEFAULT=kl_restore ...   the selection the goal verdicts of report.md are evaluated for
# DEADLINE_S counts from this script's start (pip install included); REPORT_S of it is kept for
# the log bundle and the report. The GDN kernel is the pure-torch reference on CUDA (no Triton
# compile per process), so fla is not needed; TRITON_CACHE_DIR still points outside the checkout.
#
# Wheels in .whl/ (the GPU image lacks them): omegaconf 2.3.1 and antlr4-python3-runtime 4.9.3
# (factory.config), datasets 4.4.1, dill 0.4.0 and multiprocess 0.70.18 (data packing); the image
# has torch, transformers, matplotlib, pyarrow, xxhash, fsspec.
# Back in $OUT: results.json (rewritten after every arm), study.log, logs.tar.gz (each arm's
# pipeline log), report.md and study_levers_*.png.
set -uo pipefail
START=$(date +%s)
cd "$(dirname "$0")/../.."
: "${OUT:?set OUT to the folder that receives the results}"
DEADLINE_S=${DEADLINE_S:-520}
REPORT_S=${REPORT_S:-25}
WORKERS=${WORKERS:-14}
STUDY_DIR=${STUDY_DIR:-/tmp/study}

if compgen -G ".whl/*.whl" > /dev/null; then  # none where the packages are installed (a CPU dry run)
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        || exit 1
fi
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 WANDB_MODE=disabled
export TRITON_CACHE_DIR=${TRITON_CACHE_DIR:-/tmp/triton-cache}
mkdir -p "$TRITON_CACHE_DIR" "$OUT" "$STUDY_DIR"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader 2>/dev/null || echo "no nvidia-smi"
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"

STOP_AT=$((START + DEADLINE_S - REPORT_S))
# The study stops its own arms at STOP_AT; SIGINT after that (and SIGKILL 10 s on) only if the
# teacher's evaluation or the data packing before the first arm overran.
timeout -s INT -k 10 $((STOP_AT - $(date +%s) + 10)) \
    python3 bench/study/run_study.py --study levers --out "$STUDY_DIR" --results "$OUT/results.json" \
    --workers "$WORKERS" --device cuda --gdn-kernel naive --deadline-at "$STOP_AT" "$@" 2>&1 | tee "$OUT/study.log"
echo "study exited with ${PIPESTATUS[0]} after $(($(date +%s) - START)) s"

(cd "$STUDY_DIR" && tar czf "$OUT/logs.tar.gz" ./*.log) || echo "no arm logs"
if [ -f "$OUT/results.json" ]; then
    python3 bench/study/report.py "$OUT/results.json" --figures "$OUT" --markdown "$OUT/report.md" \
        ${DEFAULT:+--default "$DEFAULT"} > /dev/null && echo "report: $OUT/report.md"
fi
echo "done after $(($(date +%s) - START)) s"
