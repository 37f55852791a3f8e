"""The stage registry is the one list of stages, and a stage's identity holds only what it reads."""

from __future__ import annotations

import dataclasses

import pytest

from factory.config.schema import STAGES as SCHEMA_STAGES
from factory.config.schema import PrimeConfig
from factory.stages.identity import changed_settings, identity_hash, stage_identity
from factory.stages.registry import BY_NAME, STAGES


def test_schema_stage_names_are_the_registry():
    assert SCHEMA_STAGES == tuple(stage.name for stage in STAGES)


@pytest.mark.parametrize("stage", STAGES, ids=lambda s: s.name)
def test_declared_settings_exist(stage):
    cfg = PrimeConfig()
    assert stage.slice is None or dataclasses.is_dataclass(getattr(cfg, stage.slice))
    assert stage.parent is None or stage.parent in BY_NAME
    stage_identity(stage, cfg, "cpu", "fp32", None)  # every shared path resolves


def _hash(stage: str, cfg: PrimeConfig, device: str = "cpu", parent: str | None = "p") -> str:
    return identity_hash(stage_identity(BY_NAME[stage], cfg, device, "fp32", parent))


def test_run_control_settings_are_not_identity():
    base = PrimeConfig()
    changed = PrimeConfig(threads=3, on_existing="overwrite", device="cpu")
    changed.data.num_proc, changed.data.cache_dir, changed.checkpoint.every_steps = 4, "/tmp/c", 5
    changed.logger.kind, changed.distill.log_every, changed.distill.plot = "wandb", 1, False
    changed.distill.teacher = "separate"  # for trainable=gdn both teachers give the same losses (tested)
    for stage in SCHEMA_STAGES:
        assert _hash(stage, base) == _hash(stage, changed), stage


def test_identity_follows_what_a_stage_reads():
    base, lr = PrimeConfig(), PrimeConfig()
    lr.distill.optim.lr = 5e-4
    assert [s for s in SCHEMA_STAGES if _hash(s, base) != _hash(s, lr)] == ["distill"]
    assert _hash("eval", base, "cpu") != _hash("eval", base, "cuda")  # the resolved device
    assert _hash("eval", base, parent="a") != _hash("eval", base, parent="b")


def test_changed_settings_name_the_key():
    old, new = PrimeConfig(), PrimeConfig()
    new.eval.batch_size, new.seed = 4, 1
    stage = BY_NAME["eval"]
    recorded = stage_identity(stage, old, "cpu", "fp32", "p")
    assert changed_settings(stage, recorded, stage_identity(stage, new, "cpu", "fp32", "p")) == [
        "eval.batch_size: 8 -> 4", "seed: 0 -> 1"]
    assert changed_settings(stage, recorded, stage_identity(stage, old, "cpu", "fp32", "q")) == ["an earlier stage"]


def test_recall_settings_are_eval_identity():
    """The user's recall files and the summary's warning bounds are read by eval (eval.json records them)."""
    base = PrimeConfig()
    for field, value in (("recall_files", ["mine.jsonl"]), ("recall_warn_ratio", 0.8), ("kl_warn", 0.5)):
        changed = PrimeConfig()
        setattr(changed.eval, field, value)
        assert [s for s in SCHEMA_STAGES if _hash(s, base) != _hash(s, changed)] == ["eval"], field


def test_priming_levers_are_identity_of_the_stages_they_change():
    """data.synthetic_mix changes align's and distill's rows; init.kv_heads the init (and select, whose
    scoring methods initialize GDN layers the same way)."""
    base, mix, kv = PrimeConfig(), PrimeConfig(), PrimeConfig()
    mix.data.synthetic_mix, kv.init.kv_heads = 0.2, "expanded"
    assert [s for s in SCHEMA_STAGES if _hash(s, base) != _hash(s, mix)] == ["align", "distill"]
    assert [s for s in SCHEMA_STAGES if _hash(s, base) != _hash(s, kv)] == ["select", "init"]
    stage = BY_NAME["distill"]
    old = stage_identity(stage, base, "cpu", "fp32", "p")
    assert changed_settings(stage, old, stage_identity(stage, mix, "cpu", "fp32", "p")) == [
        "data.synthetic_mix: 0.0 -> 0.2"]
