"""align and distill under ZeRO-3 on 2 CPU processes over gloo: distill's teacher paths (per-layer and
whole shared stream, separate engine) at equal losses, activation checkpointing, exact resume after
kill -9, elastic resume 2 -> 1 through universal checkpoints, SIGTERM checkpoints, refused resumes."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tests.fixtures import make_tiny_assets

pytestmark = pytest.mark.distributed
ROOT = Path(__file__).resolve().parents[2]
STAGES = ["select", "init", "align", "distill"]


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    built = make_tiny_assets(tmp_path_factory.mktemp("assets"))
    return {k: str(v) for k, v in built.items()}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(nproc: int, args: dict | list[dict]) -> subprocess.CompletedProcess:
    """``tests.distributed.driver`` under torchrun: one run, or a list of runs in the same processes."""
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port",
           str(free_port()), "-m", "tests.distributed.driver", json.dumps(args)]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


def losses(run: Path, stage: str) -> dict[int, float]:
    lines = (run / stage / "metrics.jsonl").read_text().splitlines()
    return {r["step"]: r["loss"] for r in map(json.loads, lines)}


def checkpointed(**extra) -> dict:
    return {"checkpoint.every_steps": 2, "checkpoint.keep_after_stage": True, **extra}


# The uninterrupted runs, by name: the first four stages, 4 steps each, compared with "straight" ...
LIKE_STRAIGHT = {"straight": {}, "separate_teacher": {"distill.teacher": "separate"},
                 "whole_teacher_stream": {"distill.teacher_stream": "whole"},
                 "activation_checkpointing": {"align.activation_checkpointing": True,
                                              "distill.activation_checkpointing": True,
                                              "deepspeed.param_persistence_threshold": 0}}
# ... and longctx with sequence parallelism, 3 steps, its memory options compared with plain rows.
LONGCTX_STAGES = ["select", "init", "align", "longctx"]
LONGCTX = {"plain": {}, "tiled_mlp": {"longctx.tiled_mlp_tokens": 24},
           "offloaded_checkpoints": {"longctx.activation_checkpointing": True, "longctx.offload_checkpoints": True}}


@pytest.fixture(scope="module")
def runs(assets, tmp_path_factory) -> Path:
    """Every uninterrupted run of this module, one after another in one launch of two ranks: a launch
    (interpreters, imports, process group) costs more than a run of a few steps."""
    root = tmp_path_factory.mktemp("runs")
    batch = [dict(assets=assets, output_dir=str(root / name), stages=STAGES, steps=4, **overrides)
             for name, overrides in LIKE_STRAIGHT.items()]
    batch += [dict(assets=assets, output_dir=str(root / f"longctx_{name}"), stages=LONGCTX_STAGES, steps=3,
                   **{"longctx.sp_degree": 2, **overrides}) for name, overrides in LONGCTX.items()]
    result = launch(2, batch)
    assert result.returncode == 0, result.stderr[-3000:]
    return root


@pytest.fixture(scope="module")
def straight(runs) -> Path:
    return runs / "straight"


@pytest.fixture(scope="module")
def killed_in_align(assets, tmp_path_factory) -> Path:
    """A run whose ranks were killed with -9 right after align's checkpoint of step 2 (tests resume copies)."""
    out = tmp_path_factory.mktemp("killed") / "run"
    killed = launch(2, dict(assets=assets, output_dir=str(out), stages=STAGES, steps=4, kill_after_step=2,
                            **checkpointed()))
    assert killed.returncode != 0 and not (out / "03-align" / "stage.json").exists()
    assert (out / "03-align" / "checkpoints" / "checkpoint-00000002" / "COMPLETE").exists(), killed.stderr[-3000:]
    return out


def copy_of(run: Path, tmp_path: Path) -> Path:
    out = tmp_path / "run"
    shutil.copytree(run, out)
    return out


def test_align_and_distill_run_under_zero3(straight):
    for stage in ("03-align", "04-distill"):
        assert (straight / stage / "stage.json").exists()
        assert json.loads((straight / stage / "stage.json").read_text())["world_size"] == 2
        assert (straight / stage / "model" / "model.safetensors").exists()
    assert all(v == v for v in losses(straight, "04-distill").values())


@pytest.mark.parametrize("other", ["separate_teacher", "whole_teacher_stream"])
def test_shared_teacher_equals_the_separate_teacher_under_zero3(runs, straight, other):
    """trainable=gdn: distill's teacher as a second stream through the partitioned student (its
    converted layers' attention filled from the teacher checkpoint), beside the student's in each
    layer (per_layer, the default) or as a pass of its own (whole), gives the per-step losses of the
    second-engine teacher."""
    meta = json.loads((straight / "04-distill" / "stage.json").read_text())
    assert (meta["teacher"], meta["teacher_stream"]) == ("shared", "per_layer")
    out = runs / other
    meta = json.loads((out / "04-distill" / "stage.json").read_text())
    assert (meta["teacher"], meta["teacher_stream"]) == {"separate_teacher": ("separate", None),
                                                         "whole_teacher_stream": ("shared", "whole")}[other]
    want, got = losses(out, "04-distill"), losses(straight, "04-distill")
    assert got.keys() == want.keys() and len(got) == 4
    for step, loss in want.items():
        assert got[step] == pytest.approx(loss, rel=1e-6), step


def test_activation_checkpointing_under_zero3_keeps_the_losses(runs, straight):
    """align (its GDN branches checkpointed) and distill (whole layers) with activation checkpointing
    and every parameter partitioned (no persistence threshold): with torch's non-reentrant checkpoint
    the recomputation found re-partitioned, empty weights in the backward."""
    out = runs / "activation_checkpointing"
    for stage in ("03-align", "04-distill"):
        want, got = losses(straight, stage), losses(out, stage)
        assert got.keys() == want.keys() and len(got) == 4, stage
        for step, loss in want.items():
            assert got[step] == pytest.approx(loss, rel=1e-5), (stage, step)


@pytest.fixture(scope="module")
def resumed_twice(assets, killed_in_align, tmp_path_factory):
    """The killed run resumed (align from its checkpoint of step 2), killed again with -9 after
    distill's checkpoint of step 2, and resumed again: both launches' results."""
    out = copy_of(killed_in_align, tmp_path_factory.mktemp("resumed"))
    first = launch(2, dict(assets=assets, output_dir=str(out), stages=STAGES, steps=4, kill_after_step=2,
                           kill_stage="distill", **checkpointed()))
    second = launch(2, dict(assets=assets, output_dir=str(out), stages=STAGES, steps=4, **checkpointed()))
    return out, first, second


def test_exact_resume_after_kill_9(straight, resumed_twice):
    out, first, second = resumed_twice
    assert first.returncode != 0 and (out / "03-align" / "stage.json").exists(), first.stderr[-3000:]
    assert "[align] resumed from checkpoint-00000002" in first.stdout, first.stdout[-3000:]
    assert losses(out, "03-align") == losses(straight, "03-align")  # bitwise, fp32
    assert second.returncode == 0, second.stderr[-3000:]
    assert losses(out, "04-distill") == losses(straight, "04-distill")


def test_exact_resume_of_the_shared_teacher_distill_after_kill_9(straight, resumed_twice):
    out, first, second = resumed_twice
    assert first.returncode != 0
    checkpoint = out / "04-distill" / "checkpoints" / "checkpoint-00000002"
    assert (checkpoint / "COMPLETE").exists(), first.stderr[-3000:]
    assert second.returncode == 0, second.stderr[-3000:]
    assert "[distill] resumed from checkpoint-00000002" in second.stdout
    assert json.loads((out / "04-distill" / "stage.json").read_text())["teacher"] == "shared"
    assert losses(out, "04-distill") == losses(straight, "04-distill")  # bitwise, fp32


def test_elastic_resume_two_ranks_to_one(assets, straight, killed_in_align, tmp_path):
    out = copy_of(killed_in_align, tmp_path)
    checkpoint = out / "03-align" / "checkpoints" / "checkpoint-00000002"
    resumed = launch(1, dict(assets=assets, output_dir=str(out), stages=STAGES[:3], steps=4, **checkpointed()))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from checkpoint-00000002" in resumed.stdout, resumed.stdout[-3000:]
    assert (checkpoint / "engine_universal").exists()
    after, reference = losses(out, "03-align"), losses(straight, "03-align")
    assert sorted(after) == [1, 2, 3, 4]
    for step in (3, 4):  # another world size sees other batches: close, not equal
        assert abs(after[step] - reference[step]) <= 0.5 * reference[step]


def test_sigterm_on_one_rank_checkpoints_every_rank_then_stops(assets, tmp_path):
    out = tmp_path / "run"
    result = launch(2, dict(assets=assets, output_dir=str(out), stages=STAGES[:3], steps=4, sigterm_at_step=2,
                            **{"checkpoint.keep_after_stage": True}))
    assert result.returncode != 0
    checkpoint = out / "03-align" / "checkpoints" / "checkpoint-00000002"
    assert (checkpoint / "COMPLETE").exists()
    assert {p.name for p in checkpoint.glob("rng-rank*.pt")} == {"rng-rank0.pt", "rng-rank1.pt"}


def test_changed_config_resume_is_refused(assets, killed_in_align, tmp_path):
    out = copy_of(killed_in_align, tmp_path)
    refused = launch(2, dict(assets=assets, output_dir=str(out), stages=STAGES[:3], steps=4,
                             **checkpointed(**{"align.loss": "pre_lm_head"})))  # a setting align reads
    assert refused.returncode != 0
    assert "made by a different config" in refused.stderr, refused.stderr[-3000:]


def test_longctx_with_sequence_parallelism_under_zero3(runs):
    out = runs / "longctx_plain"
    meta = json.loads((out / "04-longctx" / "stage.json").read_text())
    assert meta["sp_degree"] == 2 and meta["seq_len"] == 128
    assert meta["tokens"] == 3 * 2 * 128  # one data-parallel replica: 3 steps x 2 rows x 128 tokens
    config = json.loads((out / "04-longctx" / "model" / "config.json").read_text())
    assert config["rope_parameters"]["rope_theta"] == 20000.0


def test_longctx_memory_options_under_zero3_and_sequence_parallelism_match_plain_rows(runs):
    """longctx with sequence-tiled MLPs (ZeRO-3 gradients held back until the last tile) and with
    activation checkpoints offloaded to CPU memory gives the per-step losses of plain rows."""
    plain = losses(runs / "longctx_plain", "04-longctx")
    assert len(plain) == 3
    for name in ("tiled_mlp", "offloaded_checkpoints"):
        got = losses(runs / f"longctx_{name}", "04-longctx")
        assert got.keys() == plain.keys(), name
        for step, loss in plain.items():
            assert got[step] == pytest.approx(loss, rel=1e-5), (name, step)
