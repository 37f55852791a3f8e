"""``init``: the hybrid built from the teacher, GDN initialized from the attention it replaces."""

from __future__ import annotations

import shutil
from functools import partial

from factory.distributed.sharded import build_sharded, init_sharded
from factory.models.hqwen3 import HQwen3ForCausalLM
from factory.priming.init import build_hybrid_from_teacher, hybrid_config, init_group
from factory.priming.select import read_selection
from factory.stages.base import DEEPSPEED, MODEL, RUN, Stage
from factory.stages.context import StageContext


def run_init(ctx: StageContext) -> dict:
    """Single process: build the hybrid whole and save it. Under ZeRO-3 (every rank): teacher and
    hybrid stay partitioned and are filled and written one layer at a time."""
    selection = read_selection(ctx.parent_dir)
    layer_types = selection.layer_types()
    if ctx.env.is_main:
        shutil.rmtree(ctx.out_model_dir, ignore_errors=True)  # no stale shards from an earlier attempt
    teacher = ctx.load_teacher()
    if ctx.zero3:
        config = hybrid_config(teacher.config, layer_types, ctx.cfg.init, keep_teacher_attention=True)
        hybrid = build_sharded(HQwen3ForCausalLM, config, ctx.cfg.deepspeed, ctx.precision)
        fill = partial(init_group, init=ctx.cfg.init, seed=ctx.cfg.seed)
        extra = init_sharded(teacher, hybrid, fill, ctx.out_model_dir, ctx.env.is_main)
    else:
        hybrid = build_hybrid_from_teacher(teacher, layer_types, ctx.cfg.init, ctx.cfg.seed,
                                           keep_teacher_attention=True)
        hybrid.save_pretrained(ctx.out_model_dir)
        extra = {}
    gdn_layers = hybrid.config.linear_layers
    if ctx.env.is_main:
        ctx.tokenizer.save_pretrained(ctx.out_model_dir)
        print(f"[init] hybrid with GDN layers {gdn_layers} written to {ctx.out_model_dir}")
    return {"gdn_layers": gdn_layers, **extra}


STAGE = Stage("init", run_init, slice="init", shared=(*RUN, *MODEL, *DEEPSPEED), parent="select", ranks="zero3")
