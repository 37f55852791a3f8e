"""Ctrl-C from the command line: SIGINT mid-stage writes a checkpoint, says so in one line and exits
130; the rerun resumes from it and says so. The same runs, with stdout a pipe, show the progress
lines of a log (training steps, eval parts) and no DeepSpeed warning without DeepSpeed."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

from factory.checkpoint.state import checkpoint_root

ROOT = Path(__file__).resolve().parents[2]
STEPS = 60
ARGS = ["+recipe=gdn_50pct", "stages=[select,init,align,eval]",
        "select.method=alternate", f"align.steps={STEPS}", "align.batch_size=2",
        "align.log_every=1", "data.seq_len=64", "eval.heldout_rows=2", "eval.retrieval_samples=2",
        "eval.retrieval_distances=[16]", "threads=1", "checkpoint.keep_after_stage=true"]


def prime_command(out: Path) -> list[str]:
    return [sys.executable, "-m", "factory.prime", *ARGS, f"output_dir={out}"]


def env() -> dict:
    return {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled"}


def wait_for_steps(metrics: Path, proc: subprocess.Popen, steps: int, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= steps:
            return
        time.sleep(0.05)
    raise AssertionError(f"the align stage did not reach step {steps} (exit code {proc.poll()})")


def test_sigint_checkpoints_exits_130_and_the_rerun_resumes(tmp_path):
    out = tmp_path / "run"
    proc = subprocess.Popen(prime_command(out), cwd=tmp_path, env=env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    wait_for_steps(out / "03-align" / "metrics.jsonl", proc, 3)
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr[-3000:]
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in stderr, stderr[-3000:]
    found = re.fullmatch(r"interrupted: stopped by signal SIGINT after saving 03-align/checkpoint-(\d+) "
                         rf"\(step (\d+) of {STEPS}\); rerun the same command to resume", lines[0])
    assert found, lines[0]
    step = int(found.group(2))
    assert 3 <= step < STEPS and int(found.group(1)) == step
    assert (checkpoint_root(out / "03-align") / f"checkpoint-{step:08d}" / "COMPLETE").exists()
    assert re.search(rf"^\[align\] step 1/{STEPS} loss \d+\.\d+ tokens/s [\d,]+ ETA \d+:\d\d:\d\d$", stdout, re.M)
    assert not (out / "03-align" / "stage.json").exists()

    rerun = subprocess.run(prime_command(out), cwd=tmp_path, env=env(), capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert f"[align] resumed from checkpoint-{step:08d} (step {step} of {STEPS}," in rerun.stdout
    assert f"[align] step {STEPS}/{STEPS} loss" in rerun.stdout
    assert "[eval] recall, teacher" in rerun.stdout and "[eval] held-out loss and KL" in rerun.stdout
    records = [json.loads(line)["step"] for line in (out / "03-align" / "metrics.jsonl").read_text().splitlines()]
    assert records == list(range(1, STEPS + 1))
    assert "Setting accelerator" not in stderr + rerun.stderr
