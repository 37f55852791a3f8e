"""Per-stage reuse: a rerun with a changed setting reruns the first stage that reads it and every
stage after, reuses the ones before, and names the stage and the setting in one line."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from factory.pipeline import run_pipeline
from tests.fixtures import make_tiny_assets, tiny_pipeline_config

pytestmark = pytest.mark.slow
PIPELINE = ["select", "init", "align", "distill", "export", "eval"]


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return make_tiny_assets(tmp_path_factory.mktemp("assets"))


@pytest.fixture(scope="module")
def first_run(assets, tmp_path_factory):
    out = tmp_path_factory.mktemp("reuse") / "run"
    run_pipeline(config(assets, out), "")
    return out


def config(assets, out: Path, **overrides):
    return tiny_pipeline_config(assets, out, stages=PIPELINE, steps=2, **overrides)


def finished(out: Path) -> dict[str, str]:
    """Each stage's completion record (its time and hash): equal before and after means reused."""
    records = {}
    for index, name in enumerate(PIPELINE, 1):
        meta = json.loads((out / f"{index:02d}-{name}" / "stage.json").read_text())
        records[name] = (meta["finished"], meta["config_hash"], meta["seconds"])
    return records


def rerun(out: Path, cfg, capsys) -> tuple[list[str], list[str], str]:
    """Copy of the finished run, rerun with ``cfg``: the stages reused, the stages rerun, the stdout."""
    copy = out.parent / f"copy-{len(list(out.parent.iterdir()))}"
    shutil.copytree(out, copy)
    before = finished(copy)
    cfg.output_dir = str(copy)
    capsys.readouterr()
    run_pipeline(cfg, "")
    stdout = capsys.readouterr().out
    after = finished(copy)
    reused = [name for name in PIPELINE if before[name] == after[name]]
    return reused, [name for name in PIPELINE if name not in reused], stdout


def reruns_lines(stdout: str) -> list[str]:
    return [line for line in stdout.splitlines() if "reruns with changed settings" in line]


def test_unchanged_rerun_reuses_everything(assets, first_run, capsys):
    reused, rerun_stages, stdout = rerun(first_run, config(assets, first_run), capsys)
    assert reused == PIPELINE and not rerun_stages
    assert stdout.count("skipped") == len(PIPELINE) and not reruns_lines(stdout)


def test_run_control_settings_reuse_everything(assets, first_run, capsys):
    cfg = config(assets, first_run, threads=2, device="cpu", on_existing="resume")
    cfg.data.num_proc, cfg.distill.log_every, cfg.checkpoint.every_steps = 2, 5, 1
    reused, _, _ = rerun(first_run, cfg, capsys)
    assert reused == PIPELINE


def test_changed_eval_setting_reruns_only_eval(assets, first_run, capsys):
    cfg = config(assets, first_run)
    cfg.eval.batch_size = 1
    reused, rerun_stages, stdout = rerun(first_run, cfg, capsys)
    assert rerun_stages == ["eval"] and reused == PIPELINE[:-1]
    assert reruns_lines(stdout) == ["[eval] reruns with changed settings: eval.batch_size: 2 -> 1; reusing "
                                    "select, init, align, distill, export"]


def test_changed_distill_lr_reruns_distill_and_after(assets, first_run, capsys):
    cfg = config(assets, first_run)
    cfg.distill.optim.lr = 5e-4
    reused, rerun_stages, stdout = rerun(first_run, cfg, capsys)
    assert reused == ["select", "init", "align"] and rerun_stages == ["distill", "export", "eval"]
    (line,) = reruns_lines(stdout)
    assert line.startswith("[distill] reruns with changed settings: distill.optim.lr: 0.001 -> 0.0005"), line


def test_changed_model_path_reruns_everything(assets, first_run, capsys, tmp_path):
    teacher = tmp_path / "teacher-copy"
    shutil.copytree(assets["teacher"], teacher)
    cfg = config(assets, first_run)
    cfg.model.path = str(teacher)
    reused, rerun_stages, stdout = rerun(first_run, cfg, capsys)
    assert not reused and rerun_stages == PIPELINE
    (line,) = reruns_lines(stdout)
    assert line.startswith("[select] reruns with changed settings: model.path: ") and str(teacher) in line
