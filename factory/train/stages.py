"""Training stages. align and distill differ only in loss, trainable set and model setup;
``run_training`` is the one runner they share."""

from __future__ import annotations

import contextlib
import dataclasses
import shutil
import sys
from functools import partial

import torch
import torch.nn.functional as F

from factory.checkpoint.callback import CheckpointCallback
from factory.checkpoint.state import ResumeRefused, find_resumable, load_trainer_state, restore_rng
from factory.config.schema import TrainStageConfig
from factory.data.loader import RowLoader
from factory.data.chat import pack_conversations, read_conversations
from factory.data.packing import IGNORE_INDEX, PackedRows, packed_rows
from factory.distill.losses import alignment_mse, tiled_cross_entropy, tiled_kl_loss
from factory.priming.init import drop_teacher_attention, student_config, student_key
from factory.stage_context import StageContext
from factory.train.activation_checkpointing import enable_activation_checkpointing
from factory.train.callbacks import LossPlot, MetricsLogger, ProgressBar, ProgressLog, WandbLogger, truncate_metrics
from factory.train.engine import LocalEngine
from factory.train.loop import StepState, train_loop

TRAINABLE_SETS = ("gdn", "gdn+norms", "gdn+norms+attention", "all")


def select_trainable(model, trainable: str) -> list[tuple[str, torch.nn.Parameter]]:
    """Freeze everything, then unfreeze the named set. Kept teacher attention never trains."""
    if trainable not in TRAINABLE_SETS:
        raise ValueError(f"trainable '{trainable}' is not one of {TRAINABLE_SETS}")
    model.requires_grad_(False)
    chosen = []
    for name, p in model.named_parameters():
        if not student_key(model.config, name):
            continue
        gdn = ".linear_attn." in name
        norm = trainable.startswith("gdn+norms") and "norm" in name
        attention = trainable == "gdn+norms+attention" and ".self_attn." in name
        if trainable == "all" or gdn or norm or attention:
            p.requires_grad_(True)
            chosen.append((name, p))
    return chosen


def _callbacks(ctx: StageContext, stage_cfg: TrainStageConfig, start_step: int):
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
    print(f"[{ctx.name}] resumed from {path.name} (step {trainer.step} of {total_steps}, {trainer.tokens:,} tokens)",
          flush=True)
    state.step, state.tokens, state.elapsed = trainer.step, trainer.tokens, trainer.elapsed
    return state


def build_engine(ctx: StageContext, stage_cfg: TrainStageConfig, model, named_params):
    if not ctx.cfg.deepspeed.enabled:
        return LocalEngine(model, named_params, stage_cfg.optim, stage_cfg.steps, ctx.precision)
    from factory.distributed.engine import DeepSpeedTrainEngine

    # A checkpoint from another world size loads through DeepSpeed's universal format.
    found = find_resumable(ctx.stage_dir)
    elastic = found is not None and load_trainer_state(found).world_size != ctx.env.world_size
    return DeepSpeedTrainEngine(model, named_params, stage_cfg, ctx.cfg.deepspeed, ctx.precision, ctx.env,
                                load_universal=elastic)


def run_training(ctx: StageContext, stage_cfg: TrainStageConfig, model, named_params, loss_fn,
                 rows: PackedRows | None = None, sp_degree: int = 1, before_save=None,
                 offload_checkpoints: bool = False) -> dict:
    """Train on ``rows`` (default: the packed text data at the stage's row length), save the stage's
    model (``before_save()`` first, if given) and release the engine. With sequence parallelism the
    ranks of one SP group read the same rows and split them in ``loss_fn``. Activation checkpoints
    go to CPU memory with ``offload_checkpoints`` (the longctx stage's option)."""
    if rows is None:
        rows = packed_rows(ctx.cfg.data.train_files, ctx.tokenizer, stage_cfg.seq_len or ctx.cfg.data.seq_len,
                           ctx.cfg.data.text_field, ctx.cache_dir, ctx.cfg.data.num_proc)
    loader = RowLoader(rows, stage_cfg.batch_size, seed=ctx.cfg.seed, rank=ctx.env.rank // sp_degree,
                       world_size=ctx.env.world_size // sp_degree)
    if stage_cfg.activation_checkpointing:
        enable_activation_checkpointing(model, offload=offload_checkpoints)
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
    return {"steps": state.step, "tokens": state.tokens, "final_loss": state.loss,
            "train_seconds": round(state.elapsed, 2), "trainable_params": trainable, **saved}


def _save(ctx: StageContext, model) -> dict:
    """The stage's output model as an HF directory: the student alone (a hybrid that kept teacher
    attention for alignment drops it). Under ZeRO-3 every rank takes part and rank 0 writes it
    one submodule at a time (returns the gather statistics); otherwise rank 0 saves it whole."""
    keep_all = not model.config.keep_teacher_attention
    stats = {}
    if ctx.zero3:
        from factory.distributed.sharded import save_sharded

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


def align_loss_fn(model, loss: str):
    """The align stage's step loss (``layerwise`` | ``pre_lm_head``) on a hybrid that keeps the
    teacher attention; a function of its own so benchmarks time the same step."""

    def layerwise(batch):
        model.model.set_mixer_mode("align")
        model.model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False)
        linear = [layer for layer in model.model.layers if layer.is_linear]
        pairs = [layer.alignment_pair for layer in linear]
        for layer in linear:  # the loss owns the graph now; a layer holding it would keep it past the step
            layer.alignment_pair = None
        return alignment_mse(pairs), {}

    def pre_lm_head(batch):
        inputs = {"input_ids": batch["input_ids"], "position_ids": batch["position_ids"], "use_cache": False}
        with torch.no_grad():
            model.model.set_mixer_mode("teacher")
            target = model.model(**inputs).last_hidden_state
        model.model.set_mixer_mode("student")
        return F.mse_loss(model.model(**inputs).last_hidden_state.float(), target.float()), {}

    return {"layerwise": layerwise, "pre_lm_head": pre_lm_head}[loss]


def run_align(ctx: StageContext) -> dict:
    """Stage 1: GDN learns the attention it replaces, with the teacher path inside the same network."""
    cfg = ctx.cfg.align
    model = ctx.load_hybrid()
    if not model.config.keep_teacher_attention:
        raise RuntimeError("align needs the init stage's model, which keeps the teacher attention")
    params = select_trainable(model, "gdn")
    return run_training(ctx, cfg, model, params, align_loss_fn(model, cfg.loss),
                        before_save=lambda: model.model.set_mixer_mode("student"))


def load_student(ctx: StageContext):
    model = ctx.load_hybrid()
    if not model.config.keep_teacher_attention:
        return model
    if ctx.zero3:
        raise RuntimeError(f"under ZeRO-3, {ctx.name} starts from the align stage's student (the init stage's model "
                           "keeps the teacher attention); add align to the stages")
    return drop_teacher_attention(model.config, model.state_dict()).to(ctx.device)


def distill_loss_fn(ctx: StageContext, cfg: TrainStageConfig, student, teacher):
    """The distill stage's step loss: tiled forward KL of the student to the frozen teacher."""

    def kl(batch):
        inputs = {"input_ids": batch["input_ids"], "position_ids": batch["position_ids"], "use_cache": False}
        with torch.no_grad():
            target = teacher.model(**inputs).last_hidden_state
        hidden = student.model(**inputs).last_hidden_state
        with ctx.gathered([student.lm_head.weight, teacher.lm_head.weight]):
            loss = tiled_kl_loss(hidden, target, student.lm_head.weight, teacher.lm_head.weight, batch["labels"],
                                 cfg.temperature, cfg.ce_weight, cfg.loss_tile_tokens)
        return loss, {}

    return kl


def run_distill(ctx: StageContext) -> dict:
    """Stage 2: end-to-end forward KL to the frozen teacher, sequence-tiled."""
    cfg = ctx.cfg.distill
    student = load_student(ctx)
    params = select_trainable(student, cfg.trainable)
    if ctx.zero3 and student.lm_head.weight.requires_grad:
        raise RuntimeError(f"distill.trainable={cfg.trainable} trains the LM head, which the tiled loss cannot do "
                           "under ZeRO-3; use trainable=gdn or gdn+norms")
    with _frozen_teacher(ctx, cfg.batch_size) as teacher:
        return run_training(ctx, cfg, student, params, distill_loss_fn(ctx, cfg, student, teacher))


def _frozen_teacher(ctx: StageContext, micro_batch: int):
    """The teacher for the block: under DeepSpeed a second engine without optimizer, released after."""
    teacher = ctx.load_teacher()
    if not ctx.cfg.deepspeed.enabled:
        return contextlib.nullcontext(teacher)
    from factory.distributed.engine import forward_only

    return forward_only(teacher, ctx.cfg.deepspeed, ctx.precision, micro_batch)


def next_token_sum(ctx: StageContext, model, batch: dict, tile_tokens: int) -> tuple[torch.Tensor, int]:
    """Summed next-token loss over the batch's labelled positions, and their count."""
    inputs = {"input_ids": batch["input_ids"], "position_ids": batch["position_ids"], "use_cache": False}
    hidden = model.model(**inputs).last_hidden_state
    labels = batch["labels"]
    count = int((labels != IGNORE_INDEX).sum())
    head = model.lm_head
    if ctx.zero3 and head.weight.requires_grad:
        # A trained, sharded head must run as a module (its hooks own the gradient): whole logits.
        valid = labels != IGNORE_INDEX
        return F.cross_entropy(head(hidden[valid]).float(), labels[valid], reduction="sum"), count
    with ctx.gathered([head.weight]):
        return tiled_cross_entropy(hidden, head.weight, labels, tile_tokens) * count, count


def extend_context(model, rope_theta: float, max_positions: int) -> None:
    """New RoPE base and position limit; the rotary tables are rebuilt from the config."""
    from transformers.models.qwen3.modeling_qwen3 import Qwen3RotaryEmbedding

    model.config.rope_parameters = {**(model.config.rope_parameters or {}), "rope_theta": rope_theta}
    model.config.max_position_embeddings = max_positions
    device = next(model.parameters()).device
    model.model.rotary_emb = Qwen3RotaryEmbedding(config=model.config).to(device)


def run_longctx(ctx: StageContext) -> dict:
    """Stage 3: longer rows with a larger RoPE base; sequence parallel when ``sp_degree`` > 1."""
    cfg = ctx.cfg.longctx
    student = load_student(ctx)
    extend_context(student, cfg.rope_theta, cfg.max_position_embeddings)
    seq_len = cfg.seq_len or ctx.cfg.data.seq_len
    sp = None
    if cfg.sp_degree > 1:
        from factory.distributed.sequence_parallel import build_sequence_parallel

        sp = build_sequence_parallel(ctx.env.rank, ctx.env.world_size, cfg.sp_degree)
        sp.check(student.config, seq_len)
        sp.apply(student)
    if cfg.tiled_mlp_tokens:
        from factory.distributed.tiled_mlp import apply_tiled_mlp

        apply_tiled_mlp(student, cfg.tiled_mlp_tokens)
    params = select_trainable(student, cfg.trainable)
    rows = packed_rows(cfg.data_files, ctx.tokenizer, seq_len, ctx.cfg.data.text_field, ctx.cache_dir,
                       ctx.cfg.data.num_proc)

    def next_token(batch):
        if sp is None:
            total, count = next_token_sum(ctx, student, batch, cfg.loss_tile_tokens)
            return total / max(1, count), {}
        total, count = next_token_sum(ctx, student, sp.shard(batch), cfg.loss_tile_tokens)
        return sp.global_mean(total, count), {}

    def plain_attention():  # the saved config names the configured attention, not the SP wrapper
        if sp is not None:
            student.set_attn_implementation(ctx.cfg.model.attn_implementation)

    result = run_training(ctx, cfg, student, params, next_token, rows=rows, sp_degree=cfg.sp_degree,
                          before_save=plain_attention, offload_checkpoints=cfg.offload_checkpoints)
    return {**result, "seq_len": seq_len, "rope_theta": cfg.rope_theta, "sp_degree": cfg.sp_degree}


def run_sft(ctx: StageContext) -> dict:
    """Instruction tuning: next-token loss on assistant tokens of whole, packed conversations."""
    cfg = ctx.cfg.sft
    student = load_student(ctx)
    params = select_trainable(student, cfg.trainable)
    rows, stats = pack_conversations(ctx.tokenizer, read_conversations(ctx.cfg.data.chat_files),
                                     cfg.seq_len or ctx.cfg.data.seq_len, ctx.cfg.data.chat_overflow)
    if ctx.env.is_main:
        print(f"[sft] {stats.conversations} conversations in {stats.rows} rows; {stats.truncated} truncated and "
              f"{stats.dropped} dropped for exceeding the row ({ctx.cfg.data.chat_overflow})")

    def next_token(batch):
        total, count = next_token_sum(ctx, student, batch, cfg.loss_tile_tokens)
        return total / max(1, count), {}

    result = run_training(ctx, cfg, student, params, next_token, rows=rows)
    return {**result, "conversations": stats.conversations, "truncated": stats.truncated, "dropped": stats.dropped}
