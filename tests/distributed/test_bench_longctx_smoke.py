"""bench/bench_longctx_sp.py end to end on 2 CPU ranks over gloo (tiny shape): every arm at two
row lengths, the longest-row search, and the ALST memory options (offloaded checkpoints, tiled
MLPs), with the JSON report the GPU runs write."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.distributed.test_bench_zero3_smoke import free_port

pytestmark = pytest.mark.distributed
ROOT = Path(__file__).resolve().parents[2]
BENCH = ROOT / "bench" / "bench_longctx_sp.py"


def run_bench(tmp_path, *extra) -> dict:
    out = tmp_path / "sp.json"
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
           str(BENCH), "--tiny", "--iters", "1", "--warmup", "0", "--json", str(out), *extra]
    result = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(out.read_text())


def test_every_arm_at_two_lengths_with_alst_options(tmp_path):
    report = run_bench(tmp_path, "--tokens", "128,256", "--offload-checkpoints", "--tiled-mlp-tokens", "32")
    assert report["sp_degree"] == 2 and report["args"]["offload_checkpoints"]
    rows = {(r["arm"], r["tokens"]) for r in report["rows"]}
    assert rows == {(arm, t) for arm in ("hybrid_head_parallel", "hybrid_allgather", "transformer") for t in (128, 256)}
    assert all(r["step_ms"] > 0 and r["tokens_per_s"] > 0 for r in report["rows"])


def test_longest_row_search_stops_at_the_limit(tmp_path):
    # --tokens: the search's warm-up step runs at the shortest of them (else 32,768 tokens, most of the time)
    report = run_bench(tmp_path, "--arms", "hybrid_head_parallel", "--find-max", "--find-max-from", "128",
                       "--max-tokens", "512", "--find-max-refine", "2", "--tokens", "128")
    assert report["longest_row"]["hybrid_head_parallel"] == 512
