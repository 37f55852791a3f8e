"""``longctx`` (stage 3): longer rows with a larger RoPE base, next-token loss; sequence parallel
when ``sp_degree`` > 1."""

from __future__ import annotations

from factory.data.packing import packed_rows
from factory.distributed.sequence_parallel import build_sequence_parallel
from factory.models.hqwen3.student import extend_context
from factory.stages.base import DEEPSPEED, MODEL, RUN, Stage
from factory.stages.context import StageContext
from factory.stages.training import load_student, next_token_sum, run_training
from factory.train.trainable import select_trainable


def run_longctx(ctx: StageContext) -> dict:
    """Stage 3: longer rows with a larger RoPE base; sequence parallel when ``sp_degree`` > 1."""
    cfg = ctx.cfg.longctx
    student = load_student(ctx)
    extend_context(student, cfg.rope_theta, cfg.max_position_embeddings)
    seq_len = cfg.seq_len or ctx.cfg.data.seq_len
    sp = None
    if cfg.sp_degree > 1:
        sp = build_sequence_parallel(ctx.env.rank, ctx.env.world_size, cfg.sp_degree)
        sp.check(student.config, seq_len)
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

    result = run_training(ctx, cfg, student, params, next_token, rows=rows, sp=sp, before_save=plain_attention,
                          tiled_mlp_tokens=cfg.tiled_mlp_tokens, offload_checkpoints=cfg.offload_checkpoints)
    return {**result, "seq_len": seq_len, "rope_theta": cfg.rope_theta, "sp_degree": cfg.sp_degree}


STAGE = Stage("longctx", run_longctx, slice="longctx",
              shared=(*RUN, *MODEL, "data.text_field", "data.seq_len", *DEEPSPEED), parent="init", ranks="all")
