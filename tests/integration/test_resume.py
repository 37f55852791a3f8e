"""Exact resume: N steps straight equal a run killed with -9 after a checkpoint and resumed; damaged
checkpoints are skipped; SIGTERM saves before stopping; a changed config is refused."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from factory.train.checkpointing import Preempted
from factory.checkpoint.state import ResumeRefused, checkpoint_root
from factory.pipeline import run_pipeline
from tests.fixtures import make_tiny_assets, tiny_pipeline_config

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return make_tiny_assets(tmp_path_factory.mktemp("assets"))


def losses(run_dir: Path) -> dict[int, float]:
    path = run_dir / "03-align" / "metrics.jsonl"
    records = [json.loads(line) for line in path.read_text().splitlines()]
    return {r["step"]: r["loss"] for r in records}


def run_child_killed_after(cfg_kwargs: dict, kill_after_step: int, signum: int = signal.SIGKILL) -> int:
    """Run the pipeline in a child that kills itself right after saving the checkpoint of a step."""
    script = textwrap.dedent(f"""
        import os, signal
        from factory.train import checkpointing as callback
        from factory.pipeline import run_pipeline
        from tests.fixtures import tiny_pipeline_config
        original = callback.CheckpointCallback.save
        def save_then_die(self, state):
            path = original(self, state)
            if state.step == {kill_after_step}:
                os.kill(os.getpid(), {int(signum)})
            return path
        callback.CheckpointCallback.save = save_then_die
        run_pipeline(tiny_pipeline_config(**{cfg_kwargs!r}), "")
    """)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env).returncode


def child_kwargs(assets, out, **extra):
    return {"assets": {k: str(v) for k, v in assets.items()}, "output_dir": str(out), "steps": 6, **extra}


CHECKPOINTS = {"checkpoint.every_steps": 2, "checkpoint.keep_last": 3, "checkpoint.keep_after_stage": True}


@pytest.fixture(scope="module")
def straight(assets, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("straight") / "run"
    run_pipeline(tiny_pipeline_config(assets, out, steps=6), "")
    assert sorted(losses(out)) == [1, 2, 3, 4, 5, 6]
    return out


@pytest.fixture(scope="module")
def killed(assets, tmp_path_factory) -> Path:
    """A run whose process killed itself with -9 right after align's checkpoint of step 4 of 6
    (checkpoints of steps 2 and 4 kept); each test resumes a copy."""
    out = tmp_path_factory.mktemp("killed") / "run"
    assert run_child_killed_after(child_kwargs(assets, out, **CHECKPOINTS), 4) == -signal.SIGKILL
    assert not (out / "03-align" / "stage.json").exists()
    return out


def copy_of(run: Path, tmp_path: Path) -> Path:
    shutil.copytree(run, tmp_path / "run")
    return tmp_path / "run"


def test_exact_resume_after_kill_9(assets, straight, killed, tmp_path, capsys):
    resumed_dir = copy_of(killed, tmp_path)
    run_pipeline(tiny_pipeline_config(assets, resumed_dir, steps=6, **CHECKPOINTS), "")
    assert "resumed from checkpoint-00000004" in capsys.readouterr().out
    assert losses(resumed_dir) == losses(straight)  # bitwise, fp32 on CPU


def test_damaged_newest_checkpoint_is_skipped(assets, straight, killed, tmp_path, capsys):
    out = copy_of(killed, tmp_path)
    newest = checkpoint_root(out / "03-align") / "checkpoint-00000004"
    engine_file = newest / "engine.pt"
    engine_file.write_bytes(engine_file.read_bytes()[:100])  # truncated
    capsys.readouterr()
    run_pipeline(tiny_pipeline_config(assets, out, steps=6, **CHECKPOINTS), "")
    captured = capsys.readouterr().out
    assert "skipping damaged checkpoint checkpoint-00000004" in captured
    assert "resumed from checkpoint-00000002" in captured
    assert losses(out) == losses(straight)


def test_sigterm_saves_a_checkpoint_then_stops(assets, tmp_path):
    cfg = tiny_pipeline_config(assets, tmp_path / "run", steps=6, **{"checkpoint.keep_after_stage": True})
    from factory.train import loop

    original = loop.to_device
    calls = {"n": 0}

    def to_device_and_signal(batch, device):
        calls["n"] += 1
        if calls["n"] == 2:
            os.kill(os.getpid(), signal.SIGTERM)
        return original(batch, device)

    loop.to_device = to_device_and_signal
    try:
        with pytest.raises(Preempted) as err:
            run_pipeline(cfg, "")
    finally:
        loop.to_device = original
    assert err.value.step == 2 and err.value.signum == signal.SIGTERM
    assert (checkpoint_root(tmp_path / "run" / "03-align") / "checkpoint-00000002" / "COMPLETE").exists()
    assert signal.getsignal(signal.SIGTERM) is not None


def test_resume_with_changed_config_is_refused(assets, killed, tmp_path):
    out = copy_of(killed, tmp_path)
    changed = tiny_pipeline_config(assets, out, steps=6, **CHECKPOINTS)
    changed.align.optim.lr = 5e-4
    with pytest.raises(ResumeRefused, match="different config"):
        run_pipeline(changed, "")
    changed.checkpoint.force_resume = True
    run_pipeline(changed, "")
    assert (out / "03-align" / "stage.json").exists()
