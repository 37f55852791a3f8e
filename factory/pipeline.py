"""Runs the recipe's stages in order, each from its parent's directory to its own. A complete stage
whose identity (its settings, the shared settings it reads, its parent's identity) matches is
reused; the first that differs reruns, and so does everything after it."""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import datasets
import torch
import transformers

from factory.checkpoint.state import checkpoint_root
from factory.config.schema import PrimeConfig
from factory.distributed.env import DistEnv, init_distributed
from factory.eval.summary import write_summary
from factory.rundir import STAGE_JSON, PipelineDir, is_complete, mark_complete, read_stage
from factory.stages.base import Stage
from factory.stages.context import StageContext
from factory.stages.identity import changed_settings, identity_hash, stage_identity
from factory.stages.registry import BY_NAME


def resolve_device(cfg: PrimeConfig, env: DistEnv) -> tuple[torch.device, str]:
    use_cuda = cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available())
    device = torch.device("cuda", env.local_rank) if use_cuda else torch.device("cpu")
    precision = cfg.precision if cfg.precision != "auto" else ("bf16" if device.type == "cuda" else "fp32")
    return device, precision


def quiet_libraries() -> None:
    """Our own progress bar is the one that matters; silence the per-file bars of HF libraries."""
    datasets.disable_progress_bars()
    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()


def run_pipeline(cfg: PrimeConfig, resolved_yaml: str) -> Path:
    quiet_libraries()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    os.environ.setdefault("WANDB_MODE", "disabled" if cfg.logger.kind == "none" else cfg.logger.mode)
    env = init_distributed()
    if env.world_size > 1 and not cfg.deepspeed.enabled:
        raise RuntimeError(f"{env.world_size} processes need deepspeed=zero3 (deepspeed.enabled=true)")
    device, precision = resolve_device(cfg, env)
    if not cfg.deepspeed.enabled and device.type == "cpu":
        # accelerate imports deepspeed inside save_pretrained whenever it is installed, and deepspeed then
        # warns that it fell back to CPU; naming its accelerator keeps a run without DeepSpeed quiet.
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    pipeline = PipelineDir(cfg.output_dir)
    if env.is_main:
        pipeline.initialize(cfg, resolved_yaml, overwrite=cfg.on_existing == "overwrite")
    env.barrier()
    parent, parent_hash, rerun = None, None, False
    for index, name in enumerate(cfg.stages):
        stage, stage_dir = BY_NAME[name], pipeline.stage_dir(index + 1, name)
        identity = stage_identity(stage, cfg, device.type, precision, parent_hash)
        ctx = StageContext(cfg, name, stage_dir, parent, device, precision, identity_hash(identity), env,
                           ranks=stage.ranks)
        if not rerun and is_complete(stage_dir, ctx.stage_hash):
            log(env, f"[{name}] complete in {stage_dir}, skipped")
        else:
            if env.is_main:
                _prepare(stage, stage_dir, identity, cfg.stages[:index], downstream=rerun)
            rerun = True  # every later stage builds on this one's new artifact
            if ctx.collective or env.is_main:
                _run_stage(stage, ctx, identity)
        env.barrier()
        parent, parent_hash = stage_dir, ctx.stage_hash
    if not env.is_main:
        return pipeline.root
    if "eval" in cfg.stages:
        print(write_summary(pipeline.stage_dir(cfg.stages.index("eval") + 1, "eval"), pipeline.root, cfg.recipe))
    print(f"pipeline directory: {pipeline.root}")
    return pipeline.root


def _prepare(stage: Stage, stage_dir: Path, identity: dict, reused: list[str], downstream: bool) -> None:
    """Before a stage runs: a directory made from another parent (``downstream``) or by a complete run
    with other settings is stale and goes, after one line naming what changed. An incomplete one stays:
    the stage resumes from its checkpoints (refused there if they were made by other settings)."""
    if not (stage_dir / STAGE_JSON).exists() or not stage_dir.is_dir():
        if downstream:
            shutil.rmtree(stage_dir, ignore_errors=True)
        return
    previous = read_stage(stage_dir)
    if not previous.get("complete") and not downstream:
        return
    if not downstream:
        changes = changed_settings(stage, previous.get("identity"), identity)
        kept = f"; reusing {', '.join(reused)}" if reused else ""
        print(f"[{stage.name}] reruns with changed settings: {'; '.join(changes)}{kept}", flush=True)
    shutil.rmtree(stage_dir)


def log(env: DistEnv, message: str) -> None:
    if env.is_main:
        print(message, flush=True)


def _run_stage(stage: Stage, ctx: StageContext, identity: dict) -> None:
    collective = ctx.collective
    # An incomplete stage runs again; a training stage resumes from its own checkpoints.
    if ctx.env.is_main:
        (ctx.stage_dir / "stage.json").unlink(missing_ok=True)
        ctx.stage_dir.mkdir(parents=True, exist_ok=True)
    if collective:
        ctx.env.barrier()
    started = time.perf_counter()
    log(ctx.env, f"[{ctx.name}] starting in {ctx.stage_dir}")
    extra = stage.run(ctx) or {}
    if collective:
        ctx.env.barrier()
    if not ctx.env.is_main:
        return
    mark_complete(ctx.stage_dir, ctx.name, ctx.parent_dir, ctx.stage_hash, identity=identity,
                  seconds=round(time.perf_counter() - started, 2), world_size=ctx.env.world_size, **extra)
    if not ctx.cfg.checkpoint.keep_after_stage:
        shutil.rmtree(checkpoint_root(ctx.stage_dir), ignore_errors=True)
