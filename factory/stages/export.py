"""``export``: a Hugging Face directory that loads and serves without this package."""

from __future__ import annotations

import json
import shutil
from functools import partial

import torch
from transformers import GenerationConfig

from factory.checkpoint.export import DTYPES, lineage, model_card, stream_weights, write_qwen3_5
from factory.checkpoint.shards import write_model_files
from factory.models.hqwen3 import HQwen3Config, HQwen3ForCausalLM
from factory.models.hqwen3.qwen3_5 import inexact_reason
from factory.models.hqwen3.remote_code import write_remote_code
from factory.models.hqwen3.student import student_config, student_key
from factory.stages.base import Stage
from factory.stages.context import StageContext


def run_export(ctx: StageContext) -> dict:
    """The parent's student, streamed file by file into a self-contained HF directory in the export dtype
    and format (``qwen3_5``: stock transformers and vLLM; ``hqwen3``: our classes as remote code)."""
    source, out, fmt = ctx.parent_model_dir, ctx.out_model_dir, ctx.cfg.export.format
    config = HQwen3Config.from_pretrained(source)
    keep = partial(student_key, config) if config.keep_teacher_attention else (lambda key: True)
    config = student_config(config) if config.keep_teacher_attention else config
    if fmt == "qwen3_5" and inexact_reason(config):
        raise ValueError(f"export.format=qwen3_5 is not exact for this model: {inexact_reason(config)}; "
                         "use export.format=hqwen3")
    shutil.rmtree(out, ignore_errors=True)
    dtype = DTYPES[ctx.cfg.export.dtype]
    if fmt == "qwen3_5":
        tensors = write_qwen3_5(source, out, config, dtype, keep)
    else:
        tensors = stream_weights(source, out, dtype, keep)
        with torch.device("meta"):  # for the files beside the weights; no memory
            model = HQwen3ForCausalLM(config)
        write_model_files(model, out, dtype)
        write_remote_code(out)
    ctx.tokenizer.save_pretrained(out)
    generation = GenerationConfig.from_model_config(config)
    generation.eos_token_id = ctx.tokenizer.eos_token_id
    generation.pad_token_id = ctx.tokenizer.pad_token_id or ctx.tokenizer.eos_token_id
    generation.save_pretrained(out)
    stages = lineage(ctx.parent_dir)
    (out / "README.md").write_text(model_card(config, stages, ctx.cfg.model.path, ctx.cfg.recipe, fmt))
    (out / "priming.json").write_text(json.dumps({"recipe": ctx.cfg.recipe, "teacher": ctx.cfg.model.path,
                                                  "stages": stages}, indent=2, default=str) + "\n")
    print(f"[export] {out}")
    return {"export_dir": str(out), "tokens": 0, "tensors": tensors, "format": fmt}


# The model card names the recipe and the teacher; the tokenizer comes from the teacher's directory.
STAGE = Stage("export", run_export, slice="export", shared=("recipe", "model.path"), parent="init")
