"""Whole-model work on ZeRO-3 partitioned models, one submodule at a time: no process ever holds
a whole model (a Qwen3-32B is 65 GB in bf16).

Initialization: teacher and hybrid are both partitioned over the ranks (``zero.Init``). For each of
``init_groups`` (the embedding, each decoder layer, the final norm, the LM head) every rank gathers
that submodule of both models, rank 0 fills the hybrid's with the caller's function (priming's
single-process ``init_group``) and hands its tensors to a ``ShardWriter``; leaving the block broadcasts rank 0's
values into every rank's shards and frees the gathered tensors.

Saving (the training stages' output model): the same walk over one model, rank 0 writing.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch
from transformers.initialization import no_init_weights

from factory.checkpoint import shards
from factory.checkpoint.shards import ShardWriter, write_model_files
from factory.config.schema import DeepSpeedConfig
from factory.distributed.engine import zero3_loading
from factory.models.hqwen3.student import init_groups, saved_names


def build_sharded(model_class, config, ds: DeepSpeedConfig, precision: str):
    """``model_class(config)`` partitioned as it is built. Its weights are left uninitialized:
    initialization overwrites every one, and random init would cost a gather per module."""
    import deepspeed

    with zero3_loading(ds, precision) as marker, no_init_weights(), \
            deepspeed.zero.Init(config_dict_or_path=marker.config):
        return model_class(config)


@contextlib.contextmanager
def gathered_pair(read_only: torch.nn.Module, modified: torch.nn.Module):
    """Whole tensors of both submodules for the block. ``modified`` is written on rank 0 only and
    broadcast on exit; ``read_only`` is released without a broadcast."""
    import deepspeed

    with deepspeed.zero.GatheredParameters(list(read_only.parameters()), modifier_rank=None), \
            deepspeed.zero.GatheredParameters(list(modified.parameters()), modifier_rank=0):
        yield


def _resident(params: list[torch.nn.Parameter]) -> int:
    """Elements held whole on this rank (a partitioned ZeRO-3 parameter holds an empty tensor)."""
    return sum(p.data.numel() for p in params)


def _full_size(module: torch.nn.Module) -> int:
    return sum(getattr(p, "ds_numel", p.numel()) for p in module.parameters())


def init_sharded(teacher, hybrid, fill, out_dir: str | Path, is_main: bool, max_shard_bytes: int | None = None) -> dict:
    """Fill the partitioned ``hybrid`` from the partitioned ``teacher`` and write it, from rank 0, as
    a sharded safetensors checkpoint in ``out_dir``. Collective: every rank calls it. ``fill(name,
    hybrid_part, teacher_part)`` fills one gathered submodule pair (the single-process code: priming's
    ``init_group``); this module knows nothing of how.

    Returns what each rank held at once: ``gathered_peak_params`` (whole-tensor elements resident
    while a submodule pair was gathered), ``largest_group_params`` (the largest such pair),
    ``persistent_params`` (held whole throughout: ZeRO-3's small persistent parameters)."""
    everything = list({id(p): p for m in (teacher, hybrid) for p in m.parameters()}.values())
    writer = ShardWriter(out_dir, max_shard_bytes or shards.DEFAULT_SHARD_BYTES) if is_main else None
    stats = {"persistent_params": _resident(everything), "gathered_peak_params": 0, "largest_group_params": 0}
    for name in init_groups(hybrid.config):
        ours, theirs = hybrid.get_submodule(name), teacher.get_submodule(name)
        with gathered_pair(theirs, ours):
            stats["gathered_peak_params"] = max(stats["gathered_peak_params"], _resident(everything))
            stats["largest_group_params"] = max(stats["largest_group_params"], _full_size(ours) + _full_size(theirs))
            if is_main:
                fill(name, ours, theirs)
                for key, tensor in ours.state_dict(prefix=f"{name}.").items():
                    writer.add(key, tensor)
    if is_main:
        stats["shards"] = _finish(writer, saved_names(hybrid), hybrid, out_dir, "sharded initialization")
    return stats


def save_sharded(model, out_dir: str | Path, is_main: bool, keep=None, config=None,
                 max_shard_bytes: int | None = None) -> dict:
    """Write the partitioned ``model`` from rank 0 as a sharded safetensors checkpoint in ``out_dir``,
    gathering one submodule at a time. Collective: every rank calls it. ``keep(name)`` filters the
    state-dict names; ``config`` is written instead of the model's (with ``keep``, the config of the
    model those names make). Returns the same gather statistics as ``init_sharded``."""
    import deepspeed

    keep = keep or (lambda name: True)
    params = list(model.parameters())
    writer = ShardWriter(out_dir, max_shard_bytes or shards.DEFAULT_SHARD_BYTES) if is_main else None
    stats = {"persistent_params": _resident(params), "gathered_peak_params": 0, "largest_group_params": 0}
    for name in init_groups(model.config):
        part = model.get_submodule(name)
        with deepspeed.zero.GatheredParameters(list(part.parameters()), modifier_rank=None):
            stats["gathered_peak_params"] = max(stats["gathered_peak_params"], _resident(params))
            stats["largest_group_params"] = max(stats["largest_group_params"], _full_size(part))
            if is_main:
                for key, tensor in part.state_dict(prefix=f"{name}.").items():
                    if keep(key):
                        writer.add(key, tensor)
    if is_main:
        expected = {k for k in saved_names(model) if keep(k)}
        stats["shards"] = _finish(writer, expected, model, out_dir, "sharded save", config)
    return stats


def _finish(writer: ShardWriter, expected: set[str], model, out_dir: str | Path, what: str, config=None) -> int:
    """Check that every expected tensor was written, name the shards, write the files beside them.
    Returns the shard count."""
    missing = expected - writer.written
    if missing:
        raise RuntimeError(f"{what} missed {sorted(missing)[:4]}")
    count = len(writer.close())
    write_model_files(model, out_dir, next(model.parameters()).dtype, config)
    return count
