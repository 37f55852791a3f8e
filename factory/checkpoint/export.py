"""The ``export`` stage: a Hugging Face directory that loads and serves without this package."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from factory.models.hqwen3.remote_code import save_self_contained
from factory.rundir import read_stage
from factory.stage_context import StageContext

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def lineage(stage_dir: Path) -> list[dict]:
    """Stage records from the first stage to this one, following ``parent`` links."""
    chain, current = [], stage_dir
    while current is not None and (Path(current) / "stage.json").exists():
        meta = read_stage(current)
        chain.append(meta)
        current = meta.get("parent")
    return list(reversed(chain))


def model_card(config, stages: list[dict], teacher: str, recipe: str) -> str:
    layer_lines = "\n".join(f"| {i} | {'GDN' if t == 'linear_attention' else 'attention'} |"
                            for i, t in enumerate(config.layer_types))
    stage_lines = "\n".join(f"| {s['stage']} | {s.get('steps', '-')} | {s.get('tokens', '-')} |" for s in stages)
    tokens = sum(int(s.get("tokens", 0) or 0) for s in stages)
    gdn = len(config.linear_layers)
    return f"""---
library_name: transformers
tags: [hybrid, gated-deltanet, primed]
---
# Primed hybrid of `{teacher}`

Made by Hybrid Model Factory, recipe `{recipe}`: {gdn} of {config.num_hidden_layers} attention layers
became Gated DeltaNet layers, initialized from the attention weights and distilled from the
original. Tokens seen in training: {tokens:,}.

Load with `AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)`: the modeling
files here need only torch and transformers (flash-linear-attention is used on CUDA if present).

## Stages

| stage | steps | tokens |
|---|---|---|
{stage_lines}

## Layers

| layer | mixer |
|---|---|
{layer_lines}
"""


def run_export(ctx: StageContext) -> dict:
    from factory.train.stages import load_student

    model = load_student(ctx).to(DTYPES[ctx.cfg.export.dtype])
    out = ctx.out_model_dir
    save_self_contained(model, out)
    ctx.tokenizer.save_pretrained(out)
    model.generation_config.eos_token_id = ctx.tokenizer.eos_token_id
    model.generation_config.pad_token_id = ctx.tokenizer.pad_token_id or ctx.tokenizer.eos_token_id
    model.generation_config.save_pretrained(out)
    stages = lineage(ctx.parent_dir)
    (out / "README.md").write_text(model_card(model.config, stages, ctx.cfg.model.path, ctx.cfg.recipe))
    (out / "priming.json").write_text(json.dumps({"recipe": ctx.cfg.recipe, "teacher": ctx.cfg.model.path,
                                                  "stages": stages}, indent=2, default=str) + "\n")
    print(f"[export] {out}")
    return {"export_dir": str(out), "tokens": 0}
