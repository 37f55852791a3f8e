"""``distill`` (stage 2): end-to-end forward KL of the student to the frozen teacher."""

from __future__ import annotations

import torch

from factory.config.schema import TrainStageConfig
from factory.distill.losses import tiled_kl_loss
from factory.stages.base import DEEPSPEED, MODEL, RUN, TEXT, Stage
from factory.stages.context import StageContext
from factory.stages.training import frozen_teacher, load_student, run_training
from factory.train.trainable import select_trainable


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
    with frozen_teacher(ctx, cfg.batch_size) as teacher:
        return run_training(ctx, cfg, student, params, distill_loss_fn(ctx, cfg, student, teacher))


STAGE = Stage("distill", run_distill, slice="distill", shared=(*RUN, *MODEL, *TEXT, *DEEPSPEED), parent="init",
              ranks="all")
