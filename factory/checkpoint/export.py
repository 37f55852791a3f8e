"""Export pieces: the model card, the lineage of stage records, weights streamed file by file in a
new dtype. The ``export`` stage (``factory.stages.export``) puts them together."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from factory.checkpoint.shards import INDEX_NAME, ShardWriter
from factory.rundir import read_stage

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


def weight_files(model_directory: Path) -> list[Path]:
    """The safetensors files of an HF directory, in index order when sharded."""
    index = model_directory / INDEX_NAME
    if index.exists():
        names = dict.fromkeys(json.loads(index.read_text())["weight_map"].values())
        return [model_directory / name for name in names]
    return [model_directory / "model.safetensors"]


def stream_weights(source: Path, out: Path, dtype: torch.dtype, keep) -> int:
    """Copy the tensors ``keep`` accepts from ``source`` to ``out`` one at a time, floating point
    ones cast to ``dtype``: a 32B model is never whole in memory. Returns the tensors written."""
    from safetensors import safe_open

    writer = ShardWriter(out)
    for path in weight_files(source):
        with safe_open(str(path), framework="pt") as tensors:
            for key in tensors.keys():
                if keep(key):
                    tensor = tensors.get_tensor(key)
                    writer.add(key, tensor.to(dtype) if tensor.is_floating_point() else tensor)
    writer.close()
    return len(writer.written)
