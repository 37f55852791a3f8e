"""What the training stages share: ``run_training`` (data, engine, resume, checkpoints, callbacks,
the saved model), the student they start from, the frozen teacher, the next-token loss."""

from __future__ import annotations

import contextlib
import dataclasses
import shutil
import sys
from functools import partial

import torch
import torch.nn.functional as F

from factory.checkpoint.state import ResumeRefused, find_resumable, load_trainer_state, restore_rng
from factory.config.schema import TrainingConfig
from factory.data.loader import RowLoader
from factory.data.packing import IGNORE_INDEX, PackedRows, model_inputs, packed_rows
from factory.data.synthetic_mix import MixedRows, mix_recall_rows
from factory.distill.losses import tiled_cross_entropy
from factory.distributed.engine import DeepSpeedTrainEngine, forward_only
from factory.distributed.parallelize import parallelize
from factory.distributed.sequence_parallel import SequenceParallel
from factory.distributed.sharded import save_sharded
from factory.models.hqwen3.student import drop_teacher_attention, student_config, student_key
from factory.stages.context import StageContext
from factory.train.callbacks import (LossPlot, MetricsLogger, ProgressBar, ProgressLog, WandbLogger,
                                     truncate_metrics)
from factory.train.checkpointing import CheckpointCallback
from factory.train.engine import LocalEngine
from factory.train.loop import StepState, train_loop


def _callbacks(ctx: StageContext, stage_cfg: TrainingConfig, start_step: int):
    if not ctx.env.is_main:
        return []
    metrics = ctx.stage_dir / "metrics.jsonl"
    callbacks = [ProgressBar(ctx.name, stage_cfg.steps, start_step), MetricsLogger(metrics, stage_cfg.log_every)]
    if not sys.stdout.isatty():  # a log file or pipe: the bar (a terminal's) is invisible there
        callbacks.append(ProgressLog(ctx.name, stage_cfg.log_every))
    if stage_cfg.plot:
        callbacks.append(LossPlot(metrics, ctx.stage_dir / "loss.png", f"{ctx.cfg.recipe}: {ctx.name}"))
    if ctx.cfg.logger.kind == "wandb":
        lg = ctx.cfg.logger
        callbacks.append(WandbLogger(lg.project, lg.mode, lg.run_name or f"{ctx.cfg.recipe}-{ctx.name}",
                                     dataclasses.asdict(ctx.cfg), stage_cfg.log_every))
    return callbacks


def _resume(ctx: StageContext, engine, loader, total_steps: int) -> StepState:
    """Continue from the newest good checkpoint of this stage, if there is one."""
    state = StepState(total_steps=total_steps)
    path = find_resumable(ctx.stage_dir)
    if path is None:
        if ctx.env.is_main and (ctx.stage_dir / "metrics.jsonl").exists():
            print(f"[{ctx.name}] an earlier attempt left no checkpoint: starting again at step 0", flush=True)
            truncate_metrics(ctx.stage_dir / "metrics.jsonl", 0)  # an earlier attempt that saved nothing
        return state
    trainer = load_trainer_state(path)
    if trainer.config_hash != ctx.stage_hash and not ctx.cfg.checkpoint.force_resume:
        raise ResumeRefused(f"checkpoint {path} was made by a different config (hash {trainer.config_hash}, "
                            f"now {ctx.stage_hash}); use checkpoint.force_resume=true or on_existing=overwrite")
    engine.load(path)
    loader.load_state_dict(trainer.loader)
    restore_rng(path, ctx.env.rank)
    if ctx.env.is_main:
        truncate_metrics(ctx.stage_dir / "metrics.jsonl", trainer.step)
    if ctx.env.is_main:
        print(f"[{ctx.name}] resumed from {path.name} (step {trainer.step} of {total_steps}, "
              f"{trainer.tokens:,} tokens)", flush=True)
    state.step, state.tokens, state.elapsed = trainer.step, trainer.tokens, trainer.elapsed
    return state


def build_engine(ctx: StageContext, stage_cfg: TrainingConfig, model, named_params):
    if not ctx.cfg.deepspeed.enabled:
        return LocalEngine(model, named_params, stage_cfg.optim, stage_cfg.steps, ctx.precision)
    # A checkpoint from another world size loads through DeepSpeed's universal format.
    found = find_resumable(ctx.stage_dir)
    elastic = found is not None and load_trainer_state(found).world_size != ctx.env.world_size
    return DeepSpeedTrainEngine(model, named_params, stage_cfg, ctx.cfg.deepspeed, ctx.precision, ctx.env,
                                load_universal=elastic)


def run_training(ctx: StageContext, stage_cfg: TrainingConfig, model, named_params, loss_fn,
                 rows: PackedRows | None = None, sp: SequenceParallel | None = None, before_save=None,
                 tiled_mlp_tokens: int = 0, offload_checkpoints: bool = False) -> dict:
    """Train on ``rows`` (default: the packed text data at the stage's row length, plus synthetic recall
    rows with ``data.synthetic_mix``), save the stage's model (``before_save()`` first, if given) and
    release the engine. ``parallelize`` applies sequence
    parallelism (``sp``: the ranks of one SP group read the same rows and split them in ``loss_fn``),
    tiled MLPs and the stage's activation checkpointing (to CPU memory with ``offload_checkpoints``:
    the longctx stage's options)."""
    sp_degree = sp.degree if sp is not None else 1
    if rows is None:
        rows = _text_rows(ctx, stage_cfg)
    loader = RowLoader(rows, stage_cfg.batch_size, seed=ctx.cfg.seed, rank=ctx.env.rank // sp_degree,
                       world_size=ctx.env.world_size // sp_degree)
    parallelize(model, sp, tiled_mlp_tokens, stage_cfg.activation_checkpointing, offload_checkpoints)
    engine = build_engine(ctx, stage_cfg, model, named_params)
    state = _resume(ctx, engine, loader, stage_cfg.steps)
    checkpoints = CheckpointCallback(ctx.stage_dir, engine, loader, ctx.cfg.checkpoint, ctx.stage_hash, ctx.env.rank)
    model.train()
    state = train_loop(engine, loader, loss_fn, stage_cfg.steps, stage_cfg.grad_accum,
                       [*_callbacks(ctx, stage_cfg, state.step), checkpoints], ctx.device, state,
                       data_parallel_size=ctx.env.world_size // sp_degree)
    model.eval()
    if before_save is not None:
        before_save()
    saved = _save(ctx, model)
    engine.close()
    trainable = sum(getattr(p, "ds_numel", p.numel()) for _, p in named_params)  # whole tensors under ZeRO-3
    synthetic = {"synthetic_rows": rows.count, "rows": len(rows)} if isinstance(rows, MixedRows) else {}
    return {"steps": state.step, "tokens": state.tokens, "final_loss": state.loss,
            "train_seconds": round(state.elapsed, 2), "trainable_params": trainable, **synthetic, **saved}


def _text_rows(ctx: StageContext, stage_cfg: TrainingConfig):
    """The packed text data at the stage's row length, with ``data.synthetic_mix`` of synthetic recall rows."""
    data = ctx.cfg.data
    rows = packed_rows(data.train_files, ctx.tokenizer, stage_cfg.seq_len or data.seq_len, data.text_field,
                       ctx.cache_dir, data.num_proc)
    rows = mix_recall_rows(rows, ctx.tokenizer, data.synthetic_mix, ctx.cfg.seed)
    if isinstance(rows, MixedRows) and ctx.env.is_main:
        print(f"[{ctx.name}] {rows.count:,} of {len(rows):,} rows are synthetic recall rows "
              f"(data.synthetic_mix={data.synthetic_mix})", flush=True)
    return rows


def _save(ctx: StageContext, model) -> dict:
    """The stage's output model as an HF directory: the student alone (a hybrid that kept teacher
    attention for alignment drops it). Under ZeRO-3 every rank takes part and rank 0 writes it
    one submodule at a time (returns the gather statistics); otherwise rank 0 saves it whole."""
    keep_all = not model.config.keep_teacher_attention
    stats = {}
    if ctx.zero3:
        if ctx.env.is_main:  # no stale shards from an earlier attempt
            shutil.rmtree(ctx.out_model_dir, ignore_errors=True)
        ctx.env.barrier()
        stats = save_sharded(model, ctx.out_model_dir, ctx.env.is_main,
                             keep=None if keep_all else partial(student_key, model.config),
                             config=None if keep_all else student_config(model.config))
    elif ctx.env.is_main:
        (model if keep_all else drop_teacher_attention(model.config, model.state_dict())).save_pretrained(
            ctx.out_model_dir)
    if ctx.env.is_main:
        ctx.tokenizer.save_pretrained(ctx.out_model_dir)
    return {"save": stats} if stats else {}


def load_student(ctx: StageContext):
    model = ctx.load_hybrid()
    if not model.config.keep_teacher_attention:
        return model
    if ctx.zero3:
        raise RuntimeError(f"under ZeRO-3, {ctx.name} starts from the align stage's student (the init stage's model "
                           "keeps the teacher attention); add align to the stages")
    return drop_teacher_attention(model.config, model.state_dict()).to(ctx.device)


def frozen_teacher(ctx: StageContext, micro_batch: int):
    """The teacher for the block: under DeepSpeed a second engine without optimizer, released after.
    Its decoder stack (``teacher.model``, what the distill loss calls) starts each ZeRO-3 step."""
    teacher = ctx.load_teacher()
    if not ctx.cfg.deepspeed.enabled:
        return contextlib.nullcontext(teacher)
    return forward_only(teacher, ctx.cfg.deepspeed, ctx.precision, micro_batch, step_module="model")


def teacher_stream_hidden(model, batch: dict) -> torch.Tensor:
    """Final hidden states of the teacher stream through a hybrid that keeps the converted layers'
    attention (mixer mode ``teacher``, no grad), leaving the model in mode ``student``. No grad, so
    activation checkpointing skips it: it keeps no inputs and is never recomputed."""
    try:
        with torch.no_grad():
            model.model.set_mixer_mode("teacher")
            return model.model(**model_inputs(batch)).last_hidden_state
    finally:
        model.model.set_mixer_mode("student")


def next_token_sum(ctx: StageContext, model, batch: dict, tile_tokens: int) -> tuple[torch.Tensor, int]:
    """Summed next-token loss over the batch's labelled positions, and their count."""
    hidden = model.model(**model_inputs(batch)).last_hidden_state
    labels = batch["labels"]
    count = int((labels != IGNORE_INDEX).sum())
    head = model.lm_head
    if ctx.zero3 and head.weight.requires_grad:
        # A trained, sharded head must run as a module (its hooks own the gradient): whole logits.
        valid = labels != IGNORE_INDEX
        return F.cross_entropy(head(hidden[valid]).float(), labels[valid], reduction="sum"), count
    with ctx.gathered([head.weight]):
        return tiled_cross_entropy(hidden, head.weight, labels, tile_tokens) * count, count
