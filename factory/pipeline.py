"""Runs the recipe's stages in order, each from its parent's directory to its own, skipping
stages whose artifact is complete and was made by this config."""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import torch

from factory.checkpoint.state import checkpoint_root
from factory.config.schema import PrimeConfig
from factory.distributed.env import DistEnv, init_distributed
from factory.rundir import PipelineDir, config_hash, is_complete, mark_complete, pipeline_identity
from factory.stage_context import StageContext


def stage_functions() -> dict:
    from factory.checkpoint.export import run_export
    from factory.eval.stage import run_eval
    from factory.priming.stages import run_init, run_select
    from factory.train.stages import run_align, run_distill, run_longctx, run_sft

    return {"select": run_select, "init": run_init, "align": run_align, "distill": run_distill,
            "longctx": run_longctx, "sft": run_sft, "export": run_export, "eval": run_eval}


def resolve_device(cfg: PrimeConfig, env: DistEnv) -> tuple[torch.device, str]:
    use_cuda = cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available())
    device = torch.device("cuda", env.local_rank) if use_cuda else torch.device("cpu")
    precision = cfg.precision if cfg.precision != "auto" else ("bf16" if device.type == "cuda" else "fp32")
    return device, precision


def _stage_hash(cfg: PrimeConfig, upto: int) -> str:
    # A stage's identity is the pipeline's config and the stages before it.
    return config_hash({"pipeline": pipeline_identity(cfg), "stages": list(cfg.stages[: upto + 1])})


def quiet_libraries() -> None:
    """Our own progress bar is the one that matters; silence the per-file bars of HF libraries."""
    import datasets
    import transformers

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
    functions = stage_functions()
    parent = None
    for index, name in enumerate(cfg.stages):
        stage_dir = pipeline.stage_dir(index + 1, name)
        ctx = StageContext(cfg, name, stage_dir, parent, device, precision, _stage_hash(cfg, index), env)
        if is_complete(stage_dir, ctx.stage_hash):
            log(env, f"[{name}] complete in {stage_dir}, skipped")
        elif ctx.collective or env.is_main:
            _run_stage(functions[name], ctx)
        env.barrier()
        parent = stage_dir
    if not env.is_main:
        return pipeline.root
    if "eval" in cfg.stages:
        from factory.eval.stage import write_summary

        print(write_summary(parent if cfg.stages[-1] == "eval" else
                            pipeline.stage_dir(cfg.stages.index("eval") + 1, "eval"), pipeline.root, cfg.recipe))
    print(f"pipeline directory: {pipeline.root}")
    return pipeline.root


def log(env: DistEnv, message: str) -> None:
    if env.is_main:
        print(message, flush=True)


def _run_stage(fn, ctx: StageContext) -> None:
    collective = ctx.collective
    # An incomplete stage runs again; a training stage resumes from its own checkpoints.
    if ctx.env.is_main:
        (ctx.stage_dir / "stage.json").unlink(missing_ok=True)
        ctx.stage_dir.mkdir(parents=True, exist_ok=True)
    if collective:
        ctx.env.barrier()
    started = time.perf_counter()
    log(ctx.env, f"[{ctx.name}] starting in {ctx.stage_dir}")
    extra = fn(ctx) or {}
    if collective:
        ctx.env.barrier()
    if not ctx.env.is_main:
        return
    mark_complete(ctx.stage_dir, ctx.name, ctx.parent_dir, ctx.stage_hash,
                  seconds=round(time.perf_counter() - started, 2), world_size=ctx.env.world_size, **extra)
    if not ctx.cfg.checkpoint.keep_after_stage:
        shutil.rmtree(checkpoint_root(ctx.stage_dir), ignore_errors=True)
