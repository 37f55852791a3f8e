"""Sequence-tiled MLPs for very long rows (ALST): each decoder layer's MLP runs over tiles of the
sequence, and its backward recomputes one tile at a time, so the FFN intermediate (3 x FFN width x
tokens, e.g. 9.4 GB in bf16 for a Qwen3-8B layer at 128K tokens per rank) is never whole.

DeepSpeed's ``TiledMLP`` does the work: it holds back a ZeRO-3 parameter's gradient until the
last tile has added to it. Every rank must use the same tile count (each tile's projections gather
ZeRO-3 parameters collectively); rows have one length on every rank, and the count is agreed
across ranks anyway, once per row length (not at every layer of every step: the agreement is a
collective and a host sync).
"""

from __future__ import annotations

import math
import types

import torch
import torch.distributed as dist


def tile_count(tokens: int, tile_tokens: int, device: torch.device) -> int:
    count = max(1, math.ceil(tokens / tile_tokens))
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        agreed = torch.tensor(count, device=device)
        dist.all_reduce(agreed, op=dist.ReduceOp.MAX)
        count = int(agreed.item())
    return count


def apply_tiled_mlp(model, tile_tokens: int) -> int:
    """Tile the MLP of every decoder layer of ``model`` by ``tile_tokens`` tokens. Returns how many."""
    from deepspeed.runtime.sequence_parallel.ulysses_sp import TiledMLP

    if tile_tokens < 1:
        raise ValueError(f"tile_tokens must be positive, got {tile_tokens}")
    mlps = [layer.mlp for layer in model.model.layers]
    agreed: dict[int, int] = {}  # tokens -> tile count, shared by the layers

    def shards(x: torch.Tensor) -> int:
        tokens = x.shape[-2]
        if tokens not in agreed:
            agreed[tokens] = tile_count(tokens, tile_tokens, x.device)
        return agreed[tokens]

    for mlp in mlps:
        plain = type(mlp).forward  # the class's forward: the tiles call it, not the patched instance one

        def tiled(self, x, plain=plain):
            if not torch.is_grad_enabled():
                return plain(self, x)
            weights = [p for p in self.parameters() if p.requires_grad]
            return TiledMLP.apply(plain, self, x, shards(x), weights)

        mlp.forward = types.MethodType(tiled, mlp)
    return len(mlps)
