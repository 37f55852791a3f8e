"""Shared by the launcher tests: the short pipeline every launch runs, its environment, and the
reference run (``launch/torchrun.sh`` on one node, 2 CPU ranks under ZeRO-3) whose per-step
losses every other launch must reproduce."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
# The embedded teacher, four stages, a few steps each: short enough for 2 shared CPU cores.
OVERRIDES = ["+recipe=gdn_50pct", "stages=[select,init,align,distill]",
             "select.method=alternate", "align.steps=6", "distill.steps=3",
             "align.batch_size=2", "distill.batch_size=2", "align.log_every=1", "distill.log_every=1",
             "data.seq_len=64", "deepspeed=zero3", "threads=1"]
TRAINED = ("03-align", "04-distill")


def launch_env(**extra: str) -> dict:
    """What every rank needs, on every launcher (sbatch exports it to the job and its requeues)."""
    env = {k: v for k, v in os.environ.items() if k not in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE")}
    env.update(DS_ACCELERATOR="cpu", PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1",
               WANDB_MODE="disabled", PYTHON=sys.executable, PATH=f"{Path(sys.executable).parent}:{env['PATH']}")
    env.update(extra)
    return env


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def losses(run: Path) -> dict[str, dict[int, float]]:
    """Per-step losses of each training stage (a resumed stage appends; the last record of a step wins)."""
    out = {}
    for stage in TRAINED:
        records = map(json.loads, (run / stage / "metrics.jsonl").read_text().splitlines())
        out[stage] = {r["step"]: r["loss"] for r in records}
    return out


def tail(text: str, n: int = 4000) -> str:
    return text[-n:]


@pytest.fixture(scope="session")
def reference(tmp_path_factory) -> dict[str, dict[int, float]]:
    """The uninterrupted run: one node, 2 ranks, launched with launch/torchrun.sh."""
    out = tmp_path_factory.mktemp("reference") / "run"
    result = subprocess.run([str(ROOT / "launch" / "torchrun.sh"), "--nproc", "2", "--", *OVERRIDES,
                             f"output_dir={out}"], cwd=ROOT, env=launch_env(MASTER_PORT=str(free_port())),
                            capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, tail(result.stderr)
    got = losses(out)
    assert sorted(got["03-align"]) == [1, 2, 3, 4, 5, 6] and sorted(got["04-distill"]) == [1, 2, 3]
    return got
