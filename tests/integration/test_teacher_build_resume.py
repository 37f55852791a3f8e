"""assets/build_teacher.py with --state/--max-minutes: a build stopped at a log step and run again
ends with the weights of a build that ran straight through (so a teacher build can span several
time-limited GPU calls), and rows built in worker processes (--workers) are the rows built in the training
process."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
TINY_BUILD = ["--skip-data", "--data-out", str(ROOT / "assets" / "data"), "--vocab", "300", "--hidden", "32",
              "--layers", "2", "--head-dim", "16", "--ffn", "64", "--seq-len", "128", "--short-len", "64",
              "--batch", "2", "--short-batch", "3", "--short-steps", "4", "--steps", "4", "--log-every", "2",
              "--warmup", "2", "--eval-samples", "2", "--no-bf16", "--probe-heldout", "4"]


def build(out: Path, *extra) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, str(ROOT / "assets" / "build_teacher.py"), "--out", str(out),
                             *TINY_BUILD, *extra], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def weights(out: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(out / "model.safetensors")


def test_stopped_build_resumes_to_the_straight_result_with_workers(tmp_path):
    build(tmp_path / "straight")
    state = tmp_path / "state.pt"
    stopped = build(tmp_path / "resumed", "--state", str(state), "--max-minutes", "1e-9")
    assert "stopped after step 2 of 8" in stopped.stdout and not (tmp_path / "resumed").exists()
    resumed = build(tmp_path / "resumed", "--state", str(state), "--workers", "2")
    assert "resumed at step 2" in resumed.stdout
    want, got = weights(tmp_path / "straight"), weights(tmp_path / "resumed")
    assert want.keys() == got.keys()
    for key, value in want.items():
        assert torch.equal(got[key], value), key
