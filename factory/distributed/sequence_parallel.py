"""Sequence parallelism for hybrid models: every rank of an SP group holds a contiguous slice of
each row; token mixers see whole rows through all-to-alls over heads, never an all-gather of the
sequence.

- Attention layers (Ulysses): q, k, v go from ``[B, T/sp, H]`` to ``[B, T, H/sp]``, attention runs
  on whole rows for a block of heads, the output goes back.
- GDN layers (head-parallel): the pre-conv projections go the same way, the short convs and the
  chunked kernel run on whole rows for a block of heads (conv channels and gates are per head),
  the output comes back before the gated norm and output projection.

Everything else (embeddings, MLPs, norms, loss) works on the local slice. Key/value head counts
must be divisible by the SP degree (no head is split).
"""

from __future__ import annotations

import types
from dataclasses import dataclass

import torch
import torch.distributed as dist

ATTENTION_NAME = "factory_ulysses"


class SequenceParallelError(ValueError):
    """A shape that cannot be split across the SP group, with a one-line message."""


def _all_to_all(x: torch.Tensor, group) -> torch.Tensor:
    x = x.contiguous()  # before empty_like, which would copy a permuted layout
    out = torch.empty_like(x)
    dist.all_to_all_single(out, x, group=group)
    return out


def _seq_to_heads(x: torch.Tensor, group, degree: int) -> torch.Tensor:
    """``[B, T/sp, H, d]`` -> ``[B, T, H/sp, d]``."""
    B, t, H, d = x.shape
    chunks = x.view(B, t, degree, H // degree, d).permute(2, 0, 1, 3, 4)
    received = _all_to_all(chunks, group)  # [sp (sequence block), B, t, H/sp, d]
    return received.permute(1, 0, 2, 3, 4).reshape(B, degree * t, H // degree, d)


def _heads_to_seq(x: torch.Tensor, group, degree: int) -> torch.Tensor:
    """``[B, T, H/sp, d]`` -> ``[B, T/sp, H, d]``."""
    B, T, h, d = x.shape
    chunks = x.view(B, degree, T // degree, h, d).permute(1, 0, 2, 3, 4)
    received = _all_to_all(chunks, group)  # [sp (head block), B, T/sp, h, d]
    return received.permute(1, 2, 0, 3, 4).reshape(B, T // degree, degree * h, d)


class _SeqToHeads(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group, degree):
        ctx.group, ctx.degree = group, degree
        return _seq_to_heads(x, group, degree)

    @staticmethod
    def backward(ctx, grad):
        return _heads_to_seq(grad, ctx.group, ctx.degree), None, None


class _HeadsToSeq(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group, degree):
        ctx.group, ctx.degree = group, degree
        return _heads_to_seq(x, group, degree)

    @staticmethod
    def backward(ctx, grad):
        return _seq_to_heads(grad, ctx.group, ctx.degree), None, None


@dataclass
class RowLayout:
    """What the mixers need about the whole rows of the current batch."""

    batch: int
    seq_len: int
    cu_seqlens: torch.Tensor  # document boundaries of the whole rows, flattened
    block_mask: torch.Tensor | None  # [B, 1, T, T] when rows hold several documents


class SequenceParallel:
    def __init__(self, group, degree: int, rank: int):
        self.group, self.degree, self.rank = group, degree, rank
        self.layout: RowLayout | None = None

    def check(self, config, seq_len: int) -> None:
        if seq_len % self.degree:
            raise SequenceParallelError(f"row length {seq_len} is not divisible by the SP degree {self.degree}")
        heads = {"num_attention_heads": config.num_attention_heads,
                 "num_key_value_heads": config.num_key_value_heads}
        if getattr(config, "linear_layers", None):
            heads.update(linear_num_query_heads=config.linear_num_query_heads,
                         linear_num_key_heads=config.linear_num_key_heads,
                         linear_num_value_heads=config.linear_num_value_heads)
        for name, count in heads.items():
            if count % self.degree:
                raise SequenceParallelError(f"{name}={count} is not divisible by the SP degree {self.degree}")

    def seq_to_heads(self, x):
        return _SeqToHeads.apply(x, self.group, self.degree)

    def heads_to_seq(self, x):
        return _HeadsToSeq.apply(x, self.group, self.degree)

    def shard(self, batch: dict) -> dict:
        """This rank's slice of every ``[B, T]`` tensor; whole-row layout kept for the mixers."""
        from factory.models.hqwen3.modeling_hqwen3 import cu_seqlens_from_position_ids

        positions = batch["position_ids"]
        B, T = positions.shape
        self.layout = RowLayout(B, T, cu_seqlens_from_position_ids(positions), _block_mask(positions))
        local = T // self.degree
        return {k: v[:, self.rank * local:(self.rank + 1) * local] for k, v in batch.items()}

    def apply(self, model) -> None:
        """Route the model's mixers through this group (attention by name, GDN by instance)."""
        _register_attention(self)
        model.set_attn_implementation(ATTENTION_NAME)
        for layer in model.model.layers:
            if getattr(layer, "is_linear", False):
                layer.linear_attn.forward = types.MethodType(_gdn_forward(self), layer.linear_attn)

    def global_mean(self, local_sum: torch.Tensor, local_count: int) -> torch.Tensor:
        """Scaled so that gradients averaged over the SP group equal those of the whole-row mean."""
        count = torch.tensor([float(local_count)], device=local_sum.device)
        dist.all_reduce(count, group=self.group)
        return local_sum * self.degree / count.clamp_min(1.0)


def _block_mask(positions: torch.Tensor) -> torch.Tensor | None:
    starts = positions == 0
    if not bool(starts[:, 1:].any()):
        return None  # one document per row: plain causal
    doc = starts.cumsum(-1)
    T = positions.shape[1]
    causal = torch.ones(T, T, dtype=torch.bool, device=positions.device).tril()
    return (causal & (doc[:, :, None] == doc[:, None, :]))[:, None]


def _gdn_forward(sp: SequenceParallel):
    def forward(self, hidden_states, attention_mask=None, cu_seqlens=None, past_key_values=None):
        layout, s = sp.layout, self.shape
        shape = hidden_states.shape
        x = hidden_states.reshape(layout.batch, -1, shape[-1])
        B, T = layout.batch, layout.seq_len

        def whole_rows(t, dim):
            return sp.seq_to_heads(t.view(B, x.shape[1], -1, dim)).reshape(1, B * T, -1)

        q = whole_rows(self.q_proj(x), s.key_head_dim)
        k = whole_rows(self.k_proj(x), s.key_head_dim)
        v = whole_rows(self.v_proj(x), s.value_head_dim)
        a, b = whole_rows(self.a_proj(x), 1), whole_rows(self.b_proj(x), 1)
        o = self.mix_heads(q, k, v, a, b, layout.cu_seqlens, part=sp.rank, parts=sp.degree)
        o = sp.heads_to_seq(o.view(B, T, -1, s.value_head_dim))
        return self.finish(o, x).reshape(shape)

    return forward


def _register_attention(sp: SequenceParallel) -> None:
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.masking_utils import AttentionMaskInterface
    from transformers.modeling_utils import AttentionInterface

    def ulysses(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
        q, k, v = (sp.seq_to_heads(t.transpose(1, 2)).transpose(1, 2) for t in (query, key, value))
        mask = sp.layout.block_mask
        out, _ = sdpa_attention_forward(module, q, k, v, mask, dropout=dropout, scaling=scaling,
                                        is_causal=mask is None)
        return sp.heads_to_seq(out), None

    AttentionInterface.register(ATTENTION_NAME, ulysses)
    # Masks come from the whole rows (sp.layout), not from the local slice the model sees.
    AttentionMaskInterface.register(ATTENTION_NAME, lambda *args, **kwargs: None)


def build_sequence_parallel(rank: int, world_size: int, degree: int) -> SequenceParallel:
    """Consecutive blocks of ``degree`` ranks form the SP groups; data parallelism runs across them."""
    if world_size % degree:
        raise SequenceParallelError(f"world size {world_size} is not divisible by the SP degree {degree}")
    groups = [dist.new_group(list(range(start, start + degree))) for start in range(0, world_size, degree)]
    return SequenceParallel(groups[rank // degree], degree, rank % degree)
