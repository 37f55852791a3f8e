"""Activation checkpointing of one decoder layer (or one mixer), safe under DeepSpeed ZeRO-3.

A checkpointed layer keeps only its input for the backward, which recomputes the layer with
gradients on and runs its backward inside ours (as ``torch.utils.checkpoint(use_reentrant=True)``
does): the recomputation is a forward and backward of its own, the pattern DeepSpeed ZeRO-3's
gather/release hooks were written for. (torch's non-reentrant checkpoint of whole layers in the
align stage failed under ZeRO-3: an op's backward found an empty, re-partitioned weight, "size of
tensor a (0) must match ...", on 4 H100s at the Qwen3-32B shape and on 2 CPU ranks; align now
checkpoints only its GDN branches, see the decoder layer.)

With ``offload`` the kept input lives in (pinned) CPU memory until the recomputation (ALST's
offloaded checkpoints): at long rows those inputs add up to ``tokens per rank x hidden x 2 bytes``
per layer (a Qwen3-8B row of 512K tokens on 4 ranks: 1 GB per layer, 36 GB for 36 layers).
Layers run without dropout here, so no RNG state is replayed.
"""

from __future__ import annotations

import torch


class _Checkpoint(torch.autograd.Function):
    @staticmethod
    def forward(ctx, run, offload, hidden, anchor, *args):
        ctx.run, ctx.args, ctx.device = run, args, hidden.device
        ctx.hidden_requires_grad = hidden.requires_grad
        if offload:
            stored = torch.empty(hidden.shape, dtype=hidden.dtype, pin_memory=hidden.is_cuda)
            ctx.stored = stored.copy_(hidden.detach(), non_blocking=hidden.is_cuda)
        else:
            ctx.stored = hidden.detach()
        with torch.no_grad():
            return run(hidden, *args)

    @staticmethod
    def backward(ctx, grad):
        hidden = ctx.stored.to(ctx.device, non_blocking=True).requires_grad_(ctx.hidden_requires_grad)
        ctx.stored = None
        with torch.enable_grad():
            out = ctx.run(hidden, *ctx.args)
        if out.requires_grad:  # not for a frozen layer on a stream that needs no gradient yet
            torch.autograd.backward(out, grad)
        return (None, None, hidden.grad, None, *([None] * len(ctx.args)))


def checkpoint(run, hidden: torch.Tensor, *args, offload: bool = False):
    """``run(hidden, *args)`` checkpointed; ``hidden`` kept on the CPU with ``offload``. Only
    ``hidden`` receives a gradient; the other arguments (masks, rotary tables) need none."""
    # An input that requires grad, so that the backward runs even when ``hidden`` does not (frozen
    # embeddings, or align's detached mixer input) and the parameters inside still get gradients.
    anchor = torch.empty(0, device=hidden.device, requires_grad=True)
    return _Checkpoint.apply(run, offload, hidden, anchor, *args)
