"""``sft``: instruction tuning on whole, packed conversations, loss on assistant tokens."""

from __future__ import annotations

from factory.data.chat import pack_conversations, read_conversations
from factory.stages.base import DEEPSPEED, MODEL, RUN, Stage
from factory.stages.context import StageContext
from factory.stages.training import load_student, next_token_sum, run_training
from factory.train.trainable import select_trainable


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


STAGE = Stage("sft", run_sft, slice="sft",
              shared=(*RUN, *MODEL, "data.chat_files", "data.chat_overflow", "data.seq_len", *DEEPSPEED),
              parent="init", ranks="all")
