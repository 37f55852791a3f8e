"""Sequence parallelism for hybrid models: every rank of an SP group holds a contiguous slice of
each row; token mixers see whole rows through all-to-alls over heads.

- Attention layers (Ulysses): q, k, v go from ``[B, T/sp, H]`` to ``[B, T, H/sp]``, attention runs
  on whole rows for a block of heads, the output goes back. Rows holding several documents run
  causal attention per document (flash-attn's varlen kernel on CUDA when installed, else SDPA on
  each document), never a dense ``[T, T]`` mask.
- GDN layers, ``gdn_mode="head_parallel"`` (default): the pre-conv projections go the same way,
  the short convs and the chunked kernel run on whole rows for a block of heads (conv channels
  and gates are per head), the output comes back before the gated norm and output projection.
- GDN layers, ``gdn_mode="allgather"``: the published pipeline's way, kept as a baseline to
  measure against. Every rank gathers the whole rows of the layer input, runs projections, convs
  and kernel for all heads, and keeps its own slice. Never use it for training.

Everything else (embeddings, MLPs, norms, loss) works on the local slice. Row length and the
key/value head counts must be divisible by the SP degree (no head is split).
"""

from __future__ import annotations

import functools
import types
from dataclasses import dataclass

import torch
import torch.distributed as dist

from factory.models.hqwen3.modeling_hqwen3 import cu_seqlens_from_position_ids

ATTENTION_NAME = "factory_ulysses"
GDN_MODES = ("head_parallel", "allgather")


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


# torch 2.13 renamed the tensor collectives; the GPU machine's torch 2.11 has only the old names.
_all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


class _GatherSeq(torch.autograd.Function):
    """``[B, T/sp, D]`` -> ``[B, T, D]`` on every rank; backward sums the gradients of all ranks
    and hands each its own slice (reduce-scatter)."""

    @staticmethod
    def forward(ctx, x, group, degree):
        ctx.group, ctx.degree = group, degree
        B, t, D = x.shape
        out = x.new_empty(degree * B, t, D)  # gloo wants the blocks concatenated along dim 0
        _all_gather(out, x.contiguous(), group=group)
        return out.view(degree, B, t, D).permute(1, 0, 2, 3).reshape(B, degree * t, D)

    @staticmethod
    def backward(ctx, grad):
        B, T, D = grad.shape
        t = T // ctx.degree
        blocks = grad.reshape(B, ctx.degree, t, D).transpose(0, 1).reshape(ctx.degree * B, t, D)
        out = grad.new_empty(B, t, D)
        _reduce_scatter(out, blocks, group=ctx.group)
        return out, None, None


@dataclass
class RowLayout:
    """What the mixers need about the whole rows of the current batch."""

    batch: int
    seq_len: int
    cu_seqlens: torch.Tensor  # document boundaries of the whole rows, flattened
    documents: list[tuple[int, int]] | None  # (start, end) in the flattened rows; None: one per row


def row_layout(positions: torch.Tensor) -> RowLayout:
    """Layout of ``[B, T]`` rows from their ``position_ids`` (a restart begins a document)."""
    B, T = positions.shape
    cu_seqlens = cu_seqlens_from_position_ids(positions)
    bounds = cu_seqlens.tolist()  # one host sync per step; the per-document loop needs ints
    documents = list(zip(bounds[:-1], bounds[1:])) if len(bounds) - 1 > B else None
    return RowLayout(B, T, cu_seqlens, documents)


class SequenceParallel:
    def __init__(self, group, degree: int, rank: int, gdn_mode: str = "head_parallel"):
        self.group, self.degree, self.rank = group, degree, rank
        self.gdn_mode = gdn_mode
        self.layout: RowLayout | None = None

    @property
    def gdn_mode(self) -> str:
        return self._gdn_mode

    @gdn_mode.setter
    def gdn_mode(self, mode: str) -> None:
        """Read at every GDN call, so it may be switched between steps (benchmarks do)."""
        if mode not in GDN_MODES:
            raise SequenceParallelError(f"gdn_mode {mode!r} is not one of {GDN_MODES}")
        self._gdn_mode = mode

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

    def gather_seq(self, x):
        return _GatherSeq.apply(x, self.group, self.degree)

    def shard(self, batch: dict) -> dict:
        """This rank's slice of every ``[B, T]`` tensor; whole-row layout kept for the mixers."""
        self.layout = row_layout(batch["position_ids"])
        local = self.layout.seq_len // self.degree
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


@functools.cache
def _flash_varlen():
    try:
        from flash_attn import flash_attn_varlen_func
    except ImportError:
        return None
    return flash_attn_varlen_func


def document_attention(module, q, k, v, layout: RowLayout, dropout: float = 0.0, scaling=None) -> torch.Tensor:
    """Causal attention inside each document of whole rows: q ``[B, T, H, d]``, k and v
    ``[B, T, H_kv, d]`` (the layout the all-to-all delivers). Returns ``[B, T, H, d]``."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    def sdpa(*qkv):  # [*, L, heads, d] -> SDPA's [*, heads, L, d]; GQA as transformers does it
        out, _ = sdpa_attention_forward(module, *(t.transpose(-3, -2) for t in qkv), None, dropout=dropout,
                                        scaling=scaling, is_causal=True)
        return out

    if layout.documents is None:
        return sdpa(q, k, v)
    B, T, H, d = q.shape
    q, k, v = (t.reshape(B * T, *t.shape[2:]) for t in (q, k, v))
    half = q.dtype in (torch.float16, torch.bfloat16)  # flash-attn's kernels take nothing else
    flash = _flash_varlen() if q.is_cuda and half else None
    if flash is not None:
        longest = max(end - start for start, end in layout.documents)
        cu = layout.cu_seqlens.to(torch.int32)
        out = flash(q, k, v, cu, cu, longest, longest, dropout_p=dropout, softmax_scale=scaling, causal=True)
        return out.view(B, T, H, d)
    # Long-context rows hold few long documents, so a Python loop over them costs little.
    pieces = [sdpa(q[None, s:e], k[None, s:e], v[None, s:e]) for s, e in layout.documents]
    return torch.cat(pieces, dim=1).view(B, T, H, d)


def _gdn_forward(sp: SequenceParallel):
    def forward(self, hidden_states, attention_mask=None, cu_seqlens=None, past_key_values=None):
        shape = hidden_states.shape
        x = hidden_states.reshape(sp.layout.batch, -1, shape[-1])
        mix = _gdn_allgather if sp.gdn_mode == "allgather" else _gdn_head_parallel
        return mix(self, sp, x).reshape(shape)

    return forward


def _gdn_head_parallel(layer, sp: SequenceParallel, x: torch.Tensor) -> torch.Tensor:
    layout, s = sp.layout, layer.shape
    B, T = layout.batch, layout.seq_len

    def whole_rows(t, dim):
        return sp.seq_to_heads(t.view(B, x.shape[1], -1, dim)).reshape(1, B * T, -1)

    q = whole_rows(layer.q_proj(x), s.key_head_dim)
    k = whole_rows(layer.k_proj(x), s.key_head_dim)
    v = whole_rows(layer.v_proj(x), s.value_head_dim)
    a, b = whole_rows(layer.a_proj(x), 1), whole_rows(layer.b_proj(x), 1)
    o = layer.mix_heads(q, k, v, a, b, layout.cu_seqlens, part=sp.rank, parts=sp.degree)
    o = sp.heads_to_seq(o.view(B, T, -1, s.value_head_dim))
    return layer.finish(o, x)


def _gdn_allgather(layer, sp: SequenceParallel, x: torch.Tensor) -> torch.Tensor:
    """The baseline in its cheapest form: only what the convs and kernel need (projections of q, k,
    v, a, b) runs on the whole rows; the gate and output projection run on the local slice."""
    layout = sp.layout
    B, T, t = layout.batch, layout.seq_len, x.shape[1]
    whole = sp.gather_seq(x).reshape(1, B * T, -1)
    projected = (layer.q_proj(whole), layer.k_proj(whole), layer.v_proj(whole), layer.a_proj(whole),
                 layer.b_proj(whole))
    o = layer.mix_heads(*projected, layout.cu_seqlens).view(B, T, -1, layer.shape.value_head_dim)
    return layer.finish(o[:, sp.rank * t:(sp.rank + 1) * t], x)


def _register_attention(sp: SequenceParallel) -> None:
    from transformers.masking_utils import AttentionMaskInterface
    from transformers.modeling_utils import AttentionInterface

    def ulysses(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
        q, k, v = (sp.seq_to_heads(t.transpose(1, 2)) for t in (query, key, value))
        return sp.heads_to_seq(document_attention(module, q, k, v, sp.layout, dropout, scaling)), None

    AttentionInterface.register(ATTENTION_NAME, ulysses)
    # Masks come from the whole rows (sp.layout), not from the local slice the model sees.
    AttentionMaskInterface.register(ATTENTION_NAME, lambda *args, **kwargs: None)


def build_sequence_parallel(rank: int, world_size: int, degree: int,
                            gdn_mode: str = "head_parallel") -> SequenceParallel:
    """Consecutive blocks of ``degree`` ranks form the SP groups; data parallelism runs across them."""
    if world_size % degree:
        raise SequenceParallelError(f"world size {world_size} is not divisible by the SP degree {degree}")
    groups = [dist.new_group(list(range(start, start + degree))) for start in range(0, world_size, degree)]
    return SequenceParallel(groups[rank // degree], degree, rank % degree, gdn_mode)
