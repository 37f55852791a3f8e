"""The init stage under ZeRO-3 on 2 CPU processes over gloo: teacher and hybrid stay partitioned,
each layer is gathered, initialized and written on its own, and the sharded checkpoint it writes
holds bitwise the hybrid that the single-process init makes from the same seed."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.distributed.test_zero3 import free_port
from tests.fixtures import make_tiny_assets, tiny_pipeline_config

pytestmark = pytest.mark.distributed
ROOT = Path(__file__).resolve().parents[2]
SHARD_BYTES = 100_000  # the tiny hybrid is ~0.3 MB in fp32: several shards


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    built = make_tiny_assets(tmp_path_factory.mktemp("assets"))
    return {k: str(v) for k, v in built.items()}


def launch(nproc: int, **args) -> subprocess.CompletedProcess:
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port",
           str(free_port()), "-m", "tests.distributed.sharded_init_driver", json.dumps(args)]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def runs(assets, tmp_path_factory):
    """The same select + init, sharded on 2 ranks and on one process without DeepSpeed. The sharded
    run goes on with one align and one sft step (a training stage loads the sharded checkpoint with
    zero.Init and saves its own the same way) and a sharded eval."""
    from factory.pipeline import run_pipeline

    root = tmp_path_factory.mktemp("init")
    stages = ["select", "init"]
    result = launch(2, assets=assets, output_dir=str(root / "sharded"), stages=[*stages, "align", "sft", "eval"],
                    steps=1, shard_bytes=SHARD_BYTES)
    assert result.returncode == 0, result.stderr[-3000:]
    run_pipeline(tiny_pipeline_config(assets, root / "single", stages=stages), "")
    return root / "sharded", root / "single"


def test_sharded_init_writes_an_indexed_sharded_checkpoint(runs):
    sharded, single = runs
    model = sharded / "02-init" / "model"
    shards = sorted(p.name for p in model.glob("*.safetensors"))
    index = json.loads((model / "model.safetensors.index.json").read_text())
    assert len(shards) > 1 and sorted(set(index["weight_map"].values())) == shards
    assert json.loads((sharded / "02-init" / "stage.json").read_text())["world_size"] == 2
    assert json.loads((sharded / "03-align" / "stage.json").read_text())["steps"] == 1
    others = {p.name for p in model.iterdir() if "safetensors" not in p.name}
    assert others == {p.name for p in (single / "02-init" / "model").iterdir() if "safetensors" not in p.name}
    assert (model / "config.json").read_text() == (single / "02-init" / "model" / "config.json").read_text()


def test_sharded_init_equals_single_process_init_bitwise(runs):
    from factory.models.hqwen3 import HQwen3ForCausalLM

    sharded, single = runs
    assert (json.loads((sharded / "01-select" / "selection.json").read_text())["gdn_layers"]
            == json.loads((single / "01-select" / "selection.json").read_text())["gdn_layers"])
    got = HQwen3ForCausalLM.from_pretrained(sharded / "02-init" / "model").state_dict()
    want = HQwen3ForCausalLM.from_pretrained(single / "02-init" / "model").state_dict()
    assert got.keys() == want.keys() and any(".linear_attn." in k for k in got)
    for key, value in want.items():
        assert torch.equal(got[key], value), key


def test_no_rank_held_more_than_one_layer_pair(runs):
    from factory.models.hqwen3 import HQwen3ForCausalLM

    sharded, _ = runs
    meta = json.loads((sharded / "02-init" / "stage.json").read_text())
    hybrid = HQwen3ForCausalLM.from_pretrained(sharded / "02-init" / "model")
    layer = max(sum(p.numel() for p in m.parameters()) for m in hybrid.model.layers)
    embedding = hybrid.model.embed_tokens.weight.numel()
    assert meta["persistent_params"] == 0  # the driver partitions every parameter
    # Gathered at once: one submodule of the teacher and the same one of the hybrid, never more.
    assert 0 < meta["gathered_peak_params"] <= meta["largest_group_params"] <= 2 * max(layer, embedding)
    assert meta["gathered_peak_params"] < sum(p.numel() for p in hybrid.parameters()) / 2


def test_training_stage_saves_the_student_one_layer_at_a_time(runs):
    """align under ZeRO-3 writes its student through the same per-layer walk: sharded files, no kept
    teacher attention, the trained GDN weights, frozen weights as init left them."""
    from factory.models.hqwen3 import HQwen3ForCausalLM
    from factory.models.hqwen3.student import drop_teacher_attention

    sharded, _ = runs
    model_dir = sharded / "03-align" / "model"
    assert len(list(model_dir.glob("model-*.safetensors"))) > 1 and (model_dir / "tokenizer_config.json").exists()
    student = HQwen3ForCausalLM.from_pretrained(model_dir)
    hybrid = HQwen3ForCausalLM.from_pretrained(sharded / "02-init" / "model")
    want = drop_teacher_attention(hybrid.config, hybrid.state_dict()).state_dict()
    got = student.state_dict()
    assert not student.config.keep_teacher_attention and got.keys() == want.keys()
    gdn = [k for k in want if ".linear_attn." in k]
    assert any(not torch.equal(got[k], want[k]) for k in gdn), "the align step's update was not saved"
    for key in want.keys() - set(gdn):
        assert torch.equal(got[key], want[key]), key
    meta = json.loads((sharded / "03-align" / "stage.json").read_text())
    assert meta["trainable_params"] == sum(p.numel() for k, p in hybrid.named_parameters() if ".linear_attn." in k)
    stats = meta["save"]
    layer = max(sum(p.numel() for p in m.parameters()) for m in hybrid.model.layers)
    embedding = hybrid.model.embed_tokens.weight.numel()
    assert 0 < stats["gathered_peak_params"] <= stats["largest_group_params"] <= max(layer, embedding)


def test_sharded_eval_equals_whole_model_eval(runs, assets, tmp_path):
    """eval under ZeRO-3 (2 ranks, partitioned teacher, student and earlier stages' models, chat
    generation with synced ranks) gives what one process computes on the same models."""
    from factory.stages.eval import run_eval
    from factory.stages.context import StageContext

    sharded, _ = runs
    cfg = tiny_pipeline_config(assets, tmp_path, stages=["select", "init", "align", "sft", "eval"])
    ctx = StageContext(cfg, "eval", tmp_path, sharded / "04-sft", torch.device("cpu"), "fp32")
    run_eval(ctx)
    want = json.loads((tmp_path / "eval.json").read_text())
    got = json.loads((sharded / "05-eval" / "eval.json").read_text())
    assert json.loads((sharded / "05-eval" / "stage.json").read_text())["partitioned_models"]
    assert got["chat"]["prompts"] > 0 and got["heldout_before_sft"] and got["heldout_initialized_hybrid"]
    assert got["parameters"] == want["parameters"] and got["chat"] == want["chat"]
    assert got["retrieval"] == want["retrieval"]
    for key in ("heldout", "heldout_before_sft", "heldout_initialized_hybrid"):
        for metric, value in want[key].items():
            assert got[key][metric] == pytest.approx(value, rel=1e-5, abs=1e-6), (key, metric)


def test_no_stage_leaves_its_zero3_model_behind(runs):
    """align and sft (training engines), eval (forward-only engines): each releases its models."""
    sharded, _ = runs
    assert [json.loads((sharded.parent / f"modules_left_rank{r}.json").read_text()) for r in (0, 1)] == [0, 0]
