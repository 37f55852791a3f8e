"""``select``: which attention layers become GDN (``factory.priming.select``), written as selection.json."""

from __future__ import annotations

import torch
from transformers import AutoConfig

from factory.priming.scoring import ScoringInputs
from factory.priming.select import SCORING_METHODS, add_priming_share, select_layers, write_selection
from factory.stages.base import MODEL, RUN, Stage
from factory.stages.context import StageContext


def run_select(ctx: StageContext) -> dict:
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
    # The cost beside the choice, for every scoring method alike: seconds, FLOPs, share of the training stages.
    print(f"[select] {selection.method}: GDN layers {selection.gdn_layers} of {num_layers}"
          + (f"; {selection.seconds:.1f} s, {selection.compute_flops:.3g} FLOPs, "
             f"{100 * selection.share_of_priming:.2f}% of priming" if params else ""))
    return {"gdn_layers": selection.gdn_layers, "selection_tokens": selection.compute_tokens}


# Scoring reads the teacher, the calibration text (held-out files by default) and, for gdn_proxy,
# kl_trained and kl_restore, how GDN layers are initialized and the training text.
STAGE = Stage("select", run_select, slice="select",
              shared=(*RUN, *MODEL, "data.heldout_files", "data.train_files", "data.text_field", "data.seq_len",
                      "init"), parent=None)
