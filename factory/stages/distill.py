"""``distill`` (stage 2): end-to-end forward KL of the student to the frozen teacher.

The teacher runs one of two ways (``distill.teacher``; ``auto`` picks ``shared`` for trainable=gdn):

- ``shared``: with only GDN training, every other student weight is the teacher's (embeddings, MLPs,
  norms, kept attention layers, LM head), so the teacher is a second stream through the student
  itself: converted layers keep their attention (filled from the teacher checkpoint), the teacher
  stream mixes with attention in every layer under no_grad, the student stream with its own mixers,
  and one LM head serves both. ``distill.teacher_stream=per_layer`` (default) runs the two streams
  through each decoder layer back to back (``HQwen3Model.forward_dual``), so under ZeRO-3 a layer's
  weights serve both streams while gathered; ``whole`` runs the teacher as a pass of its own (mixer
  mode ``teacher``) before the student's, gathering each layer for each pass. Memory holds one model
  plus the converted layers' attention instead of a second model.
- ``separate``: the teacher is a second model (under DeepSpeed a second engine without optimizer),
  needed when shared weights train (gdn+norms and up: the teacher would drift with them).
"""

from __future__ import annotations

import json

import torch

from factory.checkpoint.export import read_weights
from factory.config.schema import DistillConfig
from factory.config.validate import resolve_model_path
from factory.data.packing import model_inputs
from factory.distill.losses import tiled_kl_loss
from factory.stages.base import DEEPSPEED, MODEL, REPORTING, RUN, TEXT, Stage
from factory.stages.context import StageContext
from factory.stages.training import frozen_teacher, load_student, run_training, teacher_stream_hidden
from factory.train.trainable import select_trainable


def teacher_kind(cfg: DistillConfig) -> str:
    """``shared`` | ``separate``: the configured one, or for ``auto`` shared exactly when only GDN trains."""
    if cfg.teacher != "auto":
        return cfg.teacher
    return "shared" if cfg.trainable == "gdn" else "separate"


def distill_loss_fn(ctx: StageContext, cfg: DistillConfig, student, teacher):
    """The distill stage's step loss: tiled forward KL of the student to the frozen teacher."""

    def kl(batch):
        with torch.no_grad():
            target = teacher.model(**model_inputs(batch)).last_hidden_state
        hidden = student.model(**model_inputs(batch)).last_hidden_state
        with ctx.gathered([student.lm_head.weight, teacher.lm_head.weight]):
            loss = tiled_kl_loss(hidden, target, student.lm_head.weight, teacher.lm_head.weight, batch["labels"],
                                 cfg.temperature, cfg.ce_weight, cfg.loss_tile_tokens)
        return loss, {}

    return kl


def shared_loss_fn(ctx: StageContext, cfg: DistillConfig, model):
    """The same loss with the teacher as a stream through ``model`` (which keeps the converted layers'
    attention), beside the student's in each layer (``per_layer``) or as a pass of its own (``whole``).
    Either way the teacher stream runs under no_grad: activation checkpointing keeps nothing of it and
    never recomputes it."""

    def kl(batch):
        if cfg.teacher_stream == "per_layer":
            target, hidden = model.model.forward_dual(**model_inputs(batch))
        else:
            target = teacher_stream_hidden(model, batch)
            hidden = model.model(**model_inputs(batch)).last_hidden_state
        head = model.lm_head.weight
        with ctx.gathered([head]):
            loss = tiled_kl_loss(hidden, target, head, head, batch["labels"], cfg.temperature, cfg.ce_weight,
                                 cfg.loss_tile_tokens)
        return loss, {}

    return kl


def fill_teacher_attention(ctx: StageContext, model) -> int:
    """Copy the converted layers' attention (``model.layers.<i>.self_attn.*``, the same names in the
    teacher checkpoint) from ``model.path`` into ``model``, reading only those tensors. Under ZeRO-3
    rank 0 reads and writes each gathered module and leaving the block broadcasts it into every
    rank's shards. Returns the tensors copied on this rank."""
    names = [f"model.layers.{i}.self_attn" for i in model.config.linear_layers]
    writes = not ctx.zero3 or ctx.env.is_main
    tensors = {}
    if writes:
        prefixes = tuple(f"{name}." for name in names)
        tensors = dict(read_weights(resolve_model_path(ctx.cfg.model.path), lambda k: k.startswith(prefixes)))
    copied = 0
    for name in names:
        part = model.get_submodule(name)
        with ctx.modifying(list(part.parameters())), torch.no_grad():
            if not writes:
                continue
            for key, param in part.named_parameters(prefix=name):
                if key not in tensors:
                    raise RuntimeError(f"the teacher checkpoint {ctx.cfg.model.path} has no {key}")
                param.data.copy_(tensors.pop(key))
                copied += 1
    return copied


def load_shared_student(ctx: StageContext):
    """The parent's student with the converted layers' teacher attention kept (init's model already
    has it; align's output does not, and gets it from the teacher checkpoint)."""
    parent = json.loads((ctx.parent_model_dir / "config.json").read_text())
    model = ctx.load_hybrid(keep_teacher_attention=True)
    if not parent.get("keep_teacher_attention"):
        fill_teacher_attention(ctx, model)
    return model


def run_distill(ctx: StageContext) -> dict:
    """Stage 2: end-to-end forward KL to the frozen teacher, sequence-tiled."""
    cfg = ctx.cfg.distill
    kind = teacher_kind(cfg)
    stream = cfg.teacher_stream if kind == "shared" else None
    if ctx.env.is_main:
        how = (f"a second stream through the student's frozen weights, distill.teacher_stream={stream}"
               if kind == "shared" else "a second model")
        print(f"[distill] teacher: {kind} ({how}; distill.trainable={cfg.trainable})", flush=True)
    if kind == "shared":
        model = load_shared_student(ctx)
        params = select_trainable(model, cfg.trainable)
        # The saved model drops the kept attention (run_training's save: keep_teacher_attention).
        result = run_training(ctx, cfg, model, params, shared_loss_fn(ctx, cfg, model),
                              before_save=lambda: model.model.set_mixer_mode("student"))
        return {**result, "teacher": kind, "teacher_stream": stream}
    student = load_student(ctx)
    params = select_trainable(student, cfg.trainable)
    if ctx.zero3 and student.lm_head.weight.requires_grad:
        raise RuntimeError(f"distill.trainable={cfg.trainable} trains the LM head, which the tiled loss cannot do "
                           "under ZeRO-3; use trainable=gdn or gdn+norms")
    with frozen_teacher(ctx, cfg.batch_size) as teacher:
        result = run_training(ctx, cfg, student, params, distill_loss_fn(ctx, cfg, student, teacher))
    return {**result, "teacher": kind, "teacher_stream": stream}


# ``teacher`` and ``teacher_stream`` are not identity: for trainable=gdn every path computes the same
# losses (tested), and any other trainable set always runs the separate teacher.
STAGE = Stage("distill", run_distill, slice="distill", shared=(*RUN, *MODEL, *TEXT, *DEEPSPEED), parent="init",
              ranks="all", ignored=(*REPORTING, "teacher", "teacher_stream"))
