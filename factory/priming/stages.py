"""The ``select`` and ``init`` stages."""

from __future__ import annotations

from factory.priming.init import build_hybrid_from_teacher
from factory.priming.select import read_selection, select_layers, write_selection
from factory.stage_context import StageContext


def run_select(ctx: StageContext) -> dict:
    from transformers import AutoConfig

    num_layers = AutoConfig.from_pretrained(ctx.cfg.model.path).num_hidden_layers
    selection = select_layers(ctx.cfg.select, num_layers)
    write_selection(selection, ctx.stage_dir)
    print(f"[select] {selection.method}: GDN layers {selection.gdn_layers} of {num_layers}")
    return {"gdn_layers": selection.gdn_layers}


def run_init(ctx: StageContext) -> dict:
    selection = read_selection(ctx.parent_dir)
    teacher = ctx.load_teacher()
    hybrid = build_hybrid_from_teacher(teacher, selection.layer_types(), ctx.cfg.init, ctx.cfg.seed,
                                       keep_teacher_attention=True)
    hybrid.save_pretrained(ctx.out_model_dir)
    ctx.tokenizer.save_pretrained(ctx.out_model_dir)
    print(f"[init] hybrid with GDN layers {hybrid.config.linear_layers} written to {ctx.out_model_dir}")
    return {"gdn_layers": hybrid.config.linear_layers}
