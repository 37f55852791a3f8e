"""distill's shared teacher (a second stream through the student's own frozen weights, per layer or as a
whole pass) against the separate teacher model, on one process in fp32: the same per-step losses for
trainable=gdn (after align and straight after init), with activation checkpointing, and after a kill -9
and resume; the saved student drops the teacher attention."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from safetensors import safe_open

from factory.pipeline import run_pipeline
from tests.fixtures import make_tiny_assets, tiny_pipeline_config

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]
STAGES = ["select", "init", "align", "distill"]
STEPS = 3


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return make_tiny_assets(tmp_path_factory.mktemp("assets"))


def config(assets, out: Path, steps: int = STEPS, **overrides):
    return tiny_pipeline_config(assets, out, stages=STAGES, steps=steps, **overrides)


def losses(run: Path) -> dict[int, float]:
    lines = (run / "04-distill" / "metrics.jsonl").read_text().splitlines()
    return {r["step"]: r["loss"] for r in map(json.loads, lines)}


def stage(run: Path) -> dict:
    return json.loads((run / "04-distill" / "stage.json").read_text())


@pytest.fixture(scope="module")
def shared(assets, tmp_path_factory):
    out = tmp_path_factory.mktemp("shared") / "run"
    run_pipeline(config(assets, out), "")  # distill.teacher=auto, trainable=gdn
    return out


def assert_close(got: dict, want: dict, rel: float = 1e-6) -> None:
    assert got.keys() == want.keys() and len(got) == STEPS
    for step, loss in want.items():
        assert got[step] == pytest.approx(loss, rel=rel), step


def test_auto_picks_shared_and_equals_the_separate_teacher(assets, shared, tmp_path):
    assert (stage(shared)["teacher"], stage(shared)["teacher_stream"]) == ("shared", "per_layer")
    out = tmp_path / "run"
    run_pipeline(config(assets, out, **{"distill.teacher": "separate"}), "")
    assert (stage(out)["teacher"], stage(out)["teacher_stream"]) == ("separate", None)
    assert_close(losses(shared), losses(out))
    with safe_open(str(shared / "04-distill" / "model" / "model.safetensors"), framework="pt") as saved:
        keys = set(saved.keys())
    converted = json.loads((shared / "04-distill" / "model" / "config.json").read_text())
    assert not converted["keep_teacher_attention"]
    for i, kind in enumerate(converted["layer_types"]):
        has_attention = f"model.layers.{i}.self_attn.q_proj.weight" in keys
        assert has_attention == (kind == "full_attention"), i


def test_gdn_and_norms_picks_the_separate_teacher(assets, tmp_path):
    out = tmp_path / "run"
    cfg = config(assets, out, steps=1, **{"distill.trainable": "gdn+norms"})
    run_pipeline(cfg, "")
    assert stage(out)["teacher"] == "separate"


def test_whole_teacher_stream_equals_per_layer(assets, shared, tmp_path):
    """distill.teacher_stream=whole (the teacher as a pass of its own) gives the per-layer stream's losses."""
    out = tmp_path / "run"
    run_pipeline(config(assets, out, **{"distill.teacher_stream": "whole"}), "")
    assert (stage(out)["teacher"], stage(out)["teacher_stream"]) == ("shared", "whole")
    assert_close(losses(out), losses(shared))


@pytest.mark.parametrize("stream", ["per_layer", "whole"])
def test_activation_checkpointing_keeps_the_shared_losses(assets, shared, tmp_path, stream):
    out = tmp_path / "run"
    run_pipeline(config(assets, out, **{"distill.activation_checkpointing": True, "distill.teacher_stream": stream}),
                 "")
    assert_close(losses(out), losses(shared))


def test_shared_resume_after_kill_9_equals_straight(assets, shared, tmp_path):
    out = tmp_path / "run"
    kwargs = {"assets": {k: str(v) for k, v in assets.items()}, "output_dir": str(out), "stages": STAGES,
              "steps": STEPS, "checkpoint.every_steps": 2, "checkpoint.keep_after_stage": True}
    script = textwrap.dedent(f"""
        import os, signal
        from factory.train import checkpointing as callback
        from factory.pipeline import run_pipeline
        from tests.fixtures import tiny_pipeline_config
        original = callback.CheckpointCallback.save
        def save_then_die(self, state):
            path = original(self, state)
            if state.step == 2 and self.stage_dir.name == "04-distill":
                os.kill(os.getpid(), signal.SIGKILL)
            return path
        callback.CheckpointCallback.save = save_then_die
        run_pipeline(tiny_pipeline_config(**{kwargs!r}), "")
    """)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    assert subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env).returncode == -signal.SIGKILL
    assert not (out / "04-distill" / "stage.json").exists()
    cfg = config(assets, out, **{"checkpoint.every_steps": 2, "checkpoint.keep_after_stage": True})
    run_pipeline(cfg, "")
    assert losses(out) == losses(shared)  # bitwise, fp32 on CPU


def test_shared_teacher_straight_after_init(assets, tmp_path):
    """Without align, distill's parent is init's model, which already keeps the teacher attention."""
    runs = {}
    for teacher in ("shared", "separate"):
        out = tmp_path / teacher
        run_pipeline(tiny_pipeline_config(assets, out, stages=["select", "init", "distill"], steps=2,
                                          **{"distill.teacher": teacher}), "")
        meta = json.loads((out / "03-distill" / "stage.json").read_text())
        assert meta["teacher"] == teacher
        runs[teacher] = {r["step"]: r["loss"] for r in map(json.loads, (out / "03-distill" / "metrics.jsonl")
                                                           .read_text().splitlines())}
    assert runs["shared"].keys() == runs["separate"].keys() and len(runs["shared"]) == 2
    for step, loss in runs["separate"].items():
        assert runs["shared"][step] == pytest.approx(loss, rel=1e-6), step
