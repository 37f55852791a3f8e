"""``parallelize``: the one place a model is prepared for long rows and many ranks.

Fixed order: sequence parallelism first (attention and GDN mixers exchange sequence shards for
heads), then tiled MLPs (each MLP over tiles of the sequence), then activation checkpointing last,
because it wraps whole decoder layers whose mixers and MLPs the first two have already replaced.
"""

from __future__ import annotations

from dataclasses import dataclass

from factory.distributed.activation_checkpointing import enable_activation_checkpointing
from factory.distributed.sequence_parallel import SequenceParallel
from factory.distributed.tiled_mlp import apply_tiled_mlp


@dataclass
class Parallelized:
    sp_degree: int = 1
    tiled_mlp_layers: int = 0
    checkpointed_layers: int = 0


def parallelize(model, sp: SequenceParallel | None = None, tiled_mlp_tokens: int = 0,
                activation_checkpointing: bool = False, offload_checkpoints: bool = False) -> Parallelized:
    """Apply what is asked to ``model`` (a causal LM) in place; returns what was applied."""
    done = Parallelized()
    if sp is not None:
        sp.apply(model)
        done.sp_degree = sp.degree
    if tiled_mlp_tokens:
        done.tiled_mlp_layers = apply_tiled_mlp(model, tiled_mlp_tokens)
    if activation_checkpointing:
        done.checkpointed_layers = enable_activation_checkpointing(model, offload=offload_checkpoints)
    return done
