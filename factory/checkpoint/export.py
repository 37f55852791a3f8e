"""Export pieces: the model card, the lineage of stage records, weights streamed file by file in a
new dtype. The ``export`` stage (``factory.stages.export``) puts them together."""

from __future__ import annotations

import json
from functools import partial
from pathlib import Path

import torch
from transformers import Qwen3_5TextConfig

from factory.checkpoint.shards import INDEX_NAME, ShardWriter
from factory.models.hqwen3 import qwen3_5
from factory.rundir import read_stage

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
LOAD_LINES = {
    "qwen3_5": "Qwen3.5 text format (`qwen3_5_text`): stock transformers loads it with no code of ours,\n"
               "`AutoModelForCausalLM.from_pretrained(path)`, and vLLM serves it: `vllm serve path`.",
    "hqwen3": "Load with `AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)`: the modeling\n"
              "files here need only torch and transformers (flash-linear-attention is used on CUDA if present).",
}


def lineage(stage_dir: Path) -> list[dict]:
    """Stage records from the first stage to this one, following ``parent`` links."""
    chain, current = [], stage_dir
    while current is not None and (Path(current) / "stage.json").exists():
        meta = read_stage(current)
        chain.append(meta)
        current = meta.get("parent")
    return list(reversed(chain))


def model_card(config, stages: list[dict], teacher: str, recipe: str, fmt: str = "hqwen3") -> str:
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

{LOAD_LINES[fmt]}

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


def read_weights(source: Path, keep):
    """``(name, tensor)`` of the tensors ``keep`` accepts, one at a time, file by file."""
    from safetensors import safe_open

    for path in weight_files(source):
        with safe_open(str(path), framework="pt") as tensors:
            for key in tensors.keys():
                if keep(key):
                    yield key, tensors.get_tensor(key)


def stream_weights(source: Path, out: Path, dtype: torch.dtype, keep, convert=None) -> int:
    """Copy the tensors ``keep`` accepts from ``source`` to ``out`` one at a time (through ``convert``,
    an iterator-to-iterator of pairs, when given), floating point ones cast to ``dtype``: a 32B model
    is never whole in memory. Returns the tensors written."""
    writer = ShardWriter(out)
    pairs = read_weights(source, keep)
    for key, tensor in (convert(pairs) if convert else pairs):
        writer.add(key, tensor.to(dtype) if tensor.is_floating_point() else tensor)
    writer.close()
    return len(writer.written)


def write_qwen3_5(source: Path, out: Path, config, dtype: torch.dtype, keep) -> int:
    """The student in the Qwen3.5 text format: weights streamed and converted, and its config."""
    fields = qwen3_5.qwen3_5_config(config)  # raises, naming the reason, where it would not be exact
    tensors = stream_weights(source, out, dtype, keep, partial(qwen3_5.convert_tensors, config))
    text_config = Qwen3_5TextConfig(**{k: v for k, v in fields.items() if k != "model_type"})
    text_config.dtype = str(dtype).removeprefix("torch.")
    text_config.save_pretrained(out)
    # Newer transformers keep the rotary fraction only inside rope_parameters; engines that read the
    # top-level field would default it to Qwen3.5's 0.25.
    saved = json.loads((out / "config.json").read_text())
    (out / "config.json").write_text(json.dumps({**saved, "partial_rotary_factor": 1.0}, indent=2) + "\n")
    return tensors
