"""The ``select`` and ``init`` stages."""

from __future__ import annotations

import shutil

import torch

from factory.priming.init import build_hybrid_from_teacher, hybrid_config
from factory.priming.select import (SCORING_METHODS, add_priming_share, read_selection, select_layers,
                                    write_selection)
from factory.stage_context import StageContext


def run_select(ctx: StageContext) -> dict:
    from transformers import AutoConfig

    from factory.priming.scoring import ScoringInputs

    cfg = ctx.cfg
    num_layers = AutoConfig.from_pretrained(cfg.model.path).num_hidden_layers
    inputs, params = None, 0
    if cfg.select.method in SCORING_METHODS:
        # One process scores (a 32B teacher in bf16 is 65 GB: one 80 GB GPU); the probe shares its tensors.
        teacher = ctx.load_teacher(torch.bfloat16 if ctx.precision == "bf16" else torch.float32)
        params = sum(p.numel() for p in teacher.parameters())
        inputs = ScoringInputs(teacher, ctx.tokenizer, cfg.data, cfg.init, cfg.seed, str(ctx.device),
                               str(ctx.cache_dir))
    selection = select_layers(cfg.select, num_layers, inputs)
    if params:
        add_priming_share(selection, cfg, params)
    write_selection(selection, ctx.stage_dir)
    print(f"[select] {selection.method}: GDN layers {selection.gdn_layers} of {num_layers}"
          + (f"; {selection.compute_flops:.3g} FLOPs, {100 * selection.share_of_priming:.2f}% of priming"
             if params else ""))
    return {"gdn_layers": selection.gdn_layers, "selection_tokens": selection.compute_tokens}


def run_init(ctx: StageContext) -> dict:
    """Single process: build the hybrid whole and save it. Under ZeRO-3 (every rank): teacher and
    hybrid stay partitioned and are filled and written one layer at a time."""
    selection = read_selection(ctx.parent_dir)
    layer_types = selection.layer_types()
    if ctx.env.is_main:
        shutil.rmtree(ctx.out_model_dir, ignore_errors=True)  # no stale shards from an earlier attempt
    teacher = ctx.load_teacher()
    if ctx.zero3:
        from factory.distributed.sharded import build_sharded, init_sharded
        from factory.models.hqwen3 import HQwen3ForCausalLM

        config = hybrid_config(teacher.config, layer_types, ctx.cfg.init, keep_teacher_attention=True)
        hybrid = build_sharded(HQwen3ForCausalLM, config, ctx.cfg.deepspeed, ctx.precision)
        extra = init_sharded(teacher, hybrid, ctx.cfg.init, ctx.cfg.seed, ctx.out_model_dir, ctx.env.is_main)
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
