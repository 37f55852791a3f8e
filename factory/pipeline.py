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
from factory.rundir import PipelineDir, config_hash, is_complete, mark_complete, pipeline_identity
from factory.stage_context import StageContext


def stage_functions() -> dict:
    from factory.checkpoint.export import run_export
    from factory.eval.stage import run_eval
    from factory.priming.stages import run_init, run_select
    from factory.train.stages import run_align, run_distill

    return {"select": run_select, "init": run_init, "align": run_align, "distill": run_distill,
            "export": run_export, "eval": run_eval}


def resolve_device(cfg: PrimeConfig) -> tuple[torch.device, str]:
    device = torch.device("cuda" if cfg.device == "auto" and torch.cuda.is_available() else
                          "cpu" if cfg.device == "auto" else cfg.device)
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
    device, precision = resolve_device(cfg)
    pipeline = PipelineDir(cfg.output_dir)
    pipeline.initialize(cfg, resolved_yaml, overwrite=cfg.on_existing == "overwrite")
    functions = stage_functions()
    parent = None
    for index, name in enumerate(cfg.stages):
        stage_dir = pipeline.stage_dir(index + 1, name)
        stage_hash = _stage_hash(cfg, index)
        if is_complete(stage_dir, stage_hash):
            print(f"[{name}] complete in {stage_dir}, skipped")
        else:
            _run_stage(functions[name], StageContext(cfg, name, stage_dir, parent, device, precision, stage_hash))
        parent = stage_dir
    if "eval" in cfg.stages:
        from factory.eval.stage import write_summary

        print(write_summary(parent if cfg.stages[-1] == "eval" else
                            pipeline.stage_dir(cfg.stages.index("eval") + 1, "eval"), pipeline.root, cfg.recipe))
    print(f"pipeline directory: {pipeline.root}")
    return pipeline.root


def _run_stage(fn, ctx: StageContext) -> None:
    # An incomplete stage runs again; a training stage resumes from its own checkpoints.
    (ctx.stage_dir / "stage.json").unlink(missing_ok=True)
    ctx.stage_dir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    print(f"[{ctx.name}] starting in {ctx.stage_dir}")
    extra = fn(ctx) or {}
    mark_complete(ctx.stage_dir, ctx.name, ctx.parent_dir, ctx.stage_hash,
                  seconds=round(time.perf_counter() - started, 2), **extra)
    if not ctx.cfg.checkpoint.keep_after_stage:
        shutil.rmtree(checkpoint_root(ctx.stage_dir), ignore_errors=True)
