"""Distillation and alignment losses.

The logit losses never hold ``[tokens x vocab]`` logits: positions are processed in tiles,
so the peak is one tile of logits for student and teacher.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from factory.data.packing import IGNORE_INDEX


def forward_kl(student: torch.Tensor, teacher: torch.Tensor, temperature: float = 1.0,
               log_probs: bool = False) -> torch.Tensor:
    """Forward KL(teacher || student) summed over positions (rows of ``[N, V]``), in fp32: the one KL
    of the project (distillation, selection scoring, evaluation). Takes logits, or log-probabilities
    with ``log_probs`` (a caller that also needs them for next-token loss computes them once)."""
    if not log_probs:
        student, teacher = student.float(), teacher.float()
        if temperature != 1.0:  # x / 1.0 is x: a pass over [N, V] saved for each
            student, teacher = student / temperature, teacher / temperature
        student = F.log_softmax(student, dim=-1)
        teacher = F.log_softmax(teacher, dim=-1)
    return (teacher.exp() * (teacher - student)).sum()


def _kl_tile(h_s, h_t, w_s, w_t, labels, temperature: float, ce_weight: float) -> torch.Tensor:
    s = (h_s @ w_s.t()).float()
    if h_t is None:  # next-token loss alone
        return F.cross_entropy(s, labels, reduction="sum")
    # scaled by T^2 so gradients keep their size across temperatures
    loss = forward_kl(s, h_t @ w_t.t(), temperature) * temperature**2
    if ce_weight:
        loss = (1 - ce_weight) * loss + ce_weight * F.cross_entropy(s, labels, reduction="sum")
    return loss


class _TiledKL(torch.autograd.Function):
    """Loss and its gradients computed tile by tile in forward; backward only scales them.

    No tile's logits outlive its iteration, and no activation checkpointing is involved, so it
    also works when the head weights are gathered ZeRO-3 shards.
    """

    @staticmethod
    def forward(ctx, h_s, w_s, h_t, w_t, labels, temperature, ce_weight, tile_tokens):
        grad_h = torch.zeros_like(h_s)
        grad_w = torch.zeros_like(w_s) if ctx.needs_input_grad[1] else None
        total = torch.zeros((), dtype=torch.float32, device=h_s.device)
        for start in range(0, h_s.shape[0], tile_tokens):
            sl = slice(start, start + tile_tokens)
            with torch.enable_grad():
                hs = h_s[sl].detach().requires_grad_()
                ws = w_s.detach().requires_grad_(grad_w is not None)
                teacher_tile = None if h_t is None else h_t[sl]
                loss = _kl_tile(hs, teacher_tile, ws, w_t, labels[sl], temperature, ce_weight)
                grads = torch.autograd.grad(loss, [hs, ws] if grad_w is not None else [hs])
            grad_h[sl] = grads[0]
            if grad_w is not None:
                grad_w += grads[1]
            total += loss.detach()
        ctx.save_for_backward(grad_h, grad_w)
        return total

    @staticmethod
    def backward(ctx, grad_out):
        grad_h, grad_w = ctx.saved_tensors
        return grad_h * grad_out, (grad_w * grad_out if grad_w is not None else None), *([None] * 6)


def tiled_kl_loss(student_hidden, teacher_hidden, student_head_weight, teacher_head_weight, labels,
                  temperature: float = 1.0, ce_weight: float = 0.0, tile_tokens: int = 1024) -> torch.Tensor:
    """Mean per-token forward KL (optionally mixed with CE) over positions whose label is not ignored.

    hidden states ``[B, T, D]`` (the teacher's without grad), head weights ``[V, D]`` (whole tensors:
    under ZeRO-3 the caller gathers them), labels ``[B, T]``.
    """
    valid = labels != IGNORE_INDEX
    h_s, h_t, y = student_hidden[valid], teacher_hidden[valid].detach(), labels[valid]
    total = _TiledKL.apply(h_s, student_head_weight, h_t, teacher_head_weight.detach(), y,
                           temperature, ce_weight, tile_tokens)
    return total / max(1, y.shape[0])


def tiled_cross_entropy(hidden, head_weight, labels, tile_tokens: int = 1024) -> torch.Tensor:
    """Mean next-token loss over positions whose label is not ignored, without full logits."""
    valid = labels != IGNORE_INDEX
    h, y = hidden[valid], labels[valid]
    return _TiledKL.apply(h, head_weight, None, None, y, 1.0, 1.0, tile_tokens) / max(1, y.shape[0])


def alignment_mse(pairs: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """Mean over converted layers of the MSE between each GDN output and the attention output it replaces."""
    losses = [F.mse_loss(pred.float(), target.float()) for pred, target in pairs]
    return torch.stack(losses).mean()
