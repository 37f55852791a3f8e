"""Distillation and alignment losses.

The logit losses never hold ``[tokens x vocab]`` logits: positions are processed in tiles
whose logits are recomputed in backward (activation checkpointing per tile), so the peak is
one tile of logits for student and teacher.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from factory.data.packing import IGNORE_INDEX


def _kl_tile(h_s, h_t, w_s, w_t, labels, temperature: float, ce_weight: float) -> torch.Tensor:
    s = (h_s @ w_s.t()).float()
    t = (h_t @ w_t.t()).float()
    logp_s = F.log_softmax(s / temperature, dim=-1)
    logp_t = F.log_softmax(t / temperature, dim=-1)
    # forward KL(teacher || student), scaled by T^2 so gradients keep their size across temperatures
    loss = (logp_t.exp() * (logp_t - logp_s)).sum() * temperature**2
    if ce_weight:
        loss = (1 - ce_weight) * loss + ce_weight * F.cross_entropy(s, labels, reduction="sum")
    return loss


def tiled_kl_loss(student_hidden, teacher_hidden, student_head, teacher_head, labels,
                  temperature: float = 1.0, ce_weight: float = 0.0, tile_tokens: int = 1024) -> torch.Tensor:
    """Mean per-token forward KL (optionally mixed with CE) over positions whose label is not ignored.

    hidden states ``[B, T, D]`` (teacher's without grad), heads ``[V, D]``, labels ``[B, T]``.
    """
    valid = labels != IGNORE_INDEX
    h_s, h_t, y = student_hidden[valid], teacher_hidden[valid].detach(), labels[valid]
    total = student_hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, y.shape[0], tile_tokens):
        sl = slice(start, start + tile_tokens)
        total = total + checkpoint(_kl_tile, h_s[sl], h_t[sl], student_head, teacher_head.detach(), y[sl],
                                   temperature, ce_weight, use_reentrant=False)
    return total / max(1, y.shape[0])


def _ce_tile(h, w, labels):
    return F.cross_entropy((h @ w.t()).float(), labels, reduction="sum")


def tiled_cross_entropy(hidden, head, labels, tile_tokens: int = 1024) -> torch.Tensor:
    """Mean next-token loss without materializing full logits."""
    valid = labels != IGNORE_INDEX
    h, y = hidden[valid], labels[valid]
    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, y.shape[0], tile_tokens):
        sl = slice(start, start + tile_tokens)
        total = total + checkpoint(_ce_tile, h[sl], head, y[sl], use_reentrant=False)
    return total / max(1, y.shape[0])


def alignment_mse(pairs: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """Mean over converted layers of the MSE between each GDN output and the attention output it replaces."""
    losses = [F.mse_loss(pred.float(), target.float()) for pred, target in pairs]
    return torch.stack(losses).mean()
