"""``DeepSpeedTrainEngine`` under ZeRO-3 with the stage losses, which call submodules rather than the
engine's forward (``tests.distributed.zero3_probe`` on CPU over gloo): ZeRO-3's trace completes and
prefetching runs; distill's per-layer teacher stream gathers each layer's weights once per forward
where the two-pass (``whole``) stream gathers them twice, at equal losses; gradient accumulation
matches the local engine."""

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
# Prefetching off and a reuse distance above one layer's weights (~54K parameters at most) but far below
# the tiny model's (~196K): a submodule's weights stay gathered for a use in the same layer, not for one
# a whole pass later, as at real sizes with DeepSpeed's default distance (1e9) and layers of 0.2-0.6B.
BY_DISTANCE = {"max_reuse_distance": 60_000, "prefetch_bucket_size": 0, "steps": 3}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def probe(nproc: int, runs: list[dict]) -> list[dict]:
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port",
           str(free_port()), "-m", "tests.distributed.zero3_probe", json.dumps(runs)]
    result = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    line = next(x for x in result.stdout.splitlines() if x.startswith("PROBE "))
    return json.loads(line[len("PROBE "):])


@pytest.fixture(scope="module")
def two_ranks():
    return probe(2, [{"stream": "per_layer", "steps": 3}, {"stream": "per_layer", **BY_DISTANCE},
                     {"stream": "whole", **BY_DISTANCE}, {"teacher": "separate", "steps": 3}])


def test_trace_completes_and_prefetching_runs(two_ranks):
    """Without the engine's micro-batch bookkeeping the trace never left its invalid state (only the
    top module's forward pre-hook resets it) and nothing was ever prefetched."""
    steps = two_ranks[0]["steps"]
    assert [s["trace_complete"] for s in steps] == [False, True, True]
    assert all(s["gathered"].get("prefetched", 0) > 0 for s in steps[1:])


def test_separate_teacher_engine_traces_and_equals_the_shared_stream(two_ranks):
    """The separate teacher's forward-only engine, run through ``teacher.model``, completes its trace
    too (its decoder stack's pre-hook starts each step); with the same weights it gives the shared
    stream's losses."""
    shared, separate = two_ranks[0]["steps"], two_ranks[3]["steps"]
    assert [s["teacher_trace_complete"] for s in separate] == [False, True, True]
    assert [s["trace_complete"] for s in separate] == [False, True, True]
    for step, (want, got) in enumerate(zip(shared, separate)):
        assert got["loss"] == pytest.approx(want["loss"], rel=1e-6), step


def test_per_layer_gathers_each_layer_once_per_forward(two_ranks):
    per_layer, whole = two_ranks[1], two_ranks[2]
    layers = per_layer["layer_params"]
    for step, (mine, theirs) in enumerate(zip(per_layer["steps"], whole["steps"])):
        assert mine["loss"] == pytest.approx(theirs["loss"], rel=1e-6), step
        mine, theirs = mine["gathered"], theirs["gathered"]
        if step == 0:  # recording the trace, every submodule is released after each call: only the
            # layers below the first converted one, which run once for both streams, are saved
            assert layers < mine["forward_layers"] < theirs["forward_layers"]
            assert theirs["forward_layers"] > 1.6 * layers
            continue
        assert mine["forward_layers"] == layers  # each decoder-layer weight once for both streams
        assert theirs["forward_layers"] > 1.6 * layers  # the shared weights twice (two passes)
        assert mine["backward_layers"] == theirs["backward_layers"]
        assert sum(mine.values()) < 0.75 * sum(theirs.values())


def test_gradient_accumulation_matches_the_local_engine():
    """ZeRO-3 copies a micro-batch's gradients over the accumulated ones unless a new micro-step was
    opened (engine.forward's job, done by ``micro_batch``): the second step's loss then moved 2.4e-4."""
    local, zero3 = probe(1, [{"engine": "local", "grad_accum": 2, "steps": 3}, {"grad_accum": 2, "steps": 3}])
    assert len(zero3["steps"]) == 3
    for step, (want, got) in enumerate(zip(local["steps"], zero3["steps"])):
        assert got["loss"] == pytest.approx(want["loss"], rel=1e-5), step
