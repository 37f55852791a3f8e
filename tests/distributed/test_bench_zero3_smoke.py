"""bench/bench_zero3_throughput.py end to end on 2 CPU ranks over gloo (all five arms, tiny shape),
and its --report merge of a 1-rank and a 2-rank result (~25 s on a 2-core machine)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.distributed
ROOT = Path(__file__).resolve().parents[2]
BENCH = ROOT / "bench" / "bench_zero3_throughput.py"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_bench_runs_every_arm_and_merges(tmp_path):
    out = tmp_path / "z.json"
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
           str(BENCH), "--shape", "tiny", "--seq-len", "256", "--steps", "2", "--warmup", "1", "--json", str(out)]
    result = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    run = json.loads(out.read_text())
    shared = ("distill_shared", "distill_shared_whole")
    assert run["world_size"] == 2 and list(run["arms"]) == ["align", "distill", *shared, "baseline"]
    for name, arm in run["arms"].items():
        assert len(arm["step_seconds"]) == 2 and arm["tokens_per_s_per_gpu"] > 0, name
        assert arm["flops_per_token"] > 0 and arm["mfu"] is None and arm["peak_memory_gib"] is None, name
    assert run["arms"]["baseline"]["trainable_params"] == run["arms"]["baseline"]["params"]
    for name in ("distill", *shared):
        assert run["arms"][name]["flops_per_token_parts"]["teacher_forward"] > 0, name
    # per-layer and whole teacher streams: the same model and losses (fp32); the per-layer stream runs
    # layer 0 (attention, below the first converted layer) once for both streams: one layer fewer
    per_layer, whole = (run["arms"][name] for name in shared)
    assert per_layer["params"] == whole["params"]
    assert 0 < per_layer["flops_per_token"] < whole["flops_per_token"]
    saved = whole["flops_per_token_parts"]["teacher_forward"] - per_layer["flops_per_token_parts"]["teacher_forward"]
    assert 0 < saved < whole["flops_per_token_parts"]["teacher_forward"] / 4
    assert per_layer["final_loss"] == pytest.approx(whole["final_loss"], rel=1e-6)
    # the student plus the converted layers' attention (the separate arm's teacher, a second model, is not counted)
    assert run["arms"]["distill_shared"]["params"] > run["arms"]["distill"]["params"]
    assert 0 < run["arms"]["align"]["trainable_params"] < run["arms"]["align"]["params"]

    # A 1-rank result twice as fast per GPU: every arm scales at 50%.
    one = {**run, "world_size": 1, "label": "1rank",
           "arms": {k: {**a, "tokens_per_s_per_gpu": 2 * a["tokens_per_s_per_gpu"]} for k, a in run["arms"].items()}}
    (tmp_path / "one.json").write_text(json.dumps(one))
    merged = tmp_path / "merged.json"
    report = subprocess.run([sys.executable, str(BENCH), "--report", str(tmp_path / "one.json"), str(out),
                             "--json", str(merged)], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert report.returncode == 0, report.stderr[-3000:]
    rows = json.loads(merged.read_text())["rows"]
    assert {(r["arm"], r["gpus"]) for r in rows} == {(a, n) for a in ("align", "distill", *shared, "baseline")
                                                        for n in (1, 2)}
    assert all(r["scaling_efficiency"] == pytest.approx(1.0 if r["gpus"] == 1 else 0.5) for r in rows)
    assert "| distill | 2 |" in report.stdout and "MFU = " in report.stdout


def test_lifecycle_bench_inits_saves_and_resumes_exactly(tmp_path):
    """bench/bench_zero3_lifecycle.py on 2 CPU ranks: every phase ran, files were written and removed,
    and the step after the checkpoint has the same loss straight and resumed (fp32: bitwise)."""
    out, scratch = tmp_path / "life.json", tmp_path / "scratch"
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
           str(ROOT / "bench" / "bench_zero3_lifecycle.py"), "--shape", "tiny", "--seq-len", "128", "--steps", "2",
           "--scratch", str(scratch), "--json", str(out)]
    result = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    life = json.loads(out.read_text())
    assert list(life["phases"]) == ["init", "load", "train", "save", "resume"]
    assert all(len(p["peak_gib_per_rank"]) == 2 for p in life["phases"].values())
    assert life["bytes"]["init"] > 4 * life["params"] * 0.9 and life["bytes"]["checkpoint"] > 0  # fp32 hybrid
    losses = life["loss_after_checkpoint"]
    assert losses["straight"] == losses["resumed"]
    stats = life["init_stats"]
    assert 0 < stats["gathered_peak_params"] <= stats["largest_group_params"] + stats["persistent_params"]
    assert not scratch.exists()
