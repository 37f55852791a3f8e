"""``align`` (stage 1): GDN learns the attention it replaces, with the teacher path inside the same
network (the init stage's model keeps the teacher attention in converted layers)."""

from __future__ import annotations

import torch.nn.functional as F

from factory.data.packing import model_inputs
from factory.distill.losses import alignment_mse
from factory.stages.base import DEEPSPEED, MODEL, RUN, TEXT, Stage
from factory.stages.context import StageContext
from factory.stages.training import run_training, teacher_stream_hidden
from factory.train.trainable import select_trainable


def align_loss_fn(model, loss: str):
    """The align stage's step loss (``layerwise`` | ``pre_lm_head``) on a hybrid that keeps the
    teacher attention; a function of its own so benchmarks time the same step."""

    def layerwise(batch):
        model.model.set_mixer_mode("align")
        model.model(**model_inputs(batch))
        linear = [layer for layer in model.model.layers if layer.is_linear]
        pairs = [layer.alignment_pair for layer in linear]
        for layer in linear:  # the loss owns the graph now; a layer holding it would keep it past the step
            layer.alignment_pair = None
        return alignment_mse(pairs), {}

    def pre_lm_head(batch):
        target = teacher_stream_hidden(model, batch)
        return F.mse_loss(model.model(**model_inputs(batch)).last_hidden_state.float(), target.float()), {}

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


STAGE = Stage("align", run_align, slice="align", shared=(*RUN, *MODEL, *TEXT, *DEEPSPEED), parent="init", ranks="all")
