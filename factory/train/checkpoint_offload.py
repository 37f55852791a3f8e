"""Activation checkpointing with the checkpoints in CPU memory (ALST's offloaded checkpoints).

With activation checkpointing a decoder layer keeps only its input for the backward, but at long
rows those inputs add up: ``tokens per rank x hidden x 2 bytes`` per layer (a Qwen3-8B row of
512K tokens on 4 ranks: 1 GB per layer, 36 GB for 36 layers). Here each layer's input is copied to
(pinned) CPU memory in the forward and brought back for the layer's recomputation in the backward,
so the device holds one layer's working set at a time.

It is a reentrant checkpoint: the backward recomputes the layer with gradients on and runs its
backward inside ours (as ``torch.utils.checkpoint(use_reentrant=True)`` does), which DeepSpeed
ZeRO-3's gradient hooks support. Layers run without dropout here, so no RNG state is replayed.
"""

from __future__ import annotations

import torch


class _OffloadedCheckpoint(torch.autograd.Function):
    @staticmethod
    def forward(ctx, run, hidden, anchor, *args):
        ctx.run, ctx.args, ctx.device = run, args, hidden.device
        ctx.hidden_requires_grad = hidden.requires_grad
        stored = torch.empty(hidden.shape, dtype=hidden.dtype, pin_memory=hidden.is_cuda)
        ctx.stored = stored.copy_(hidden.detach(), non_blocking=hidden.is_cuda)
        with torch.no_grad():
            return run(hidden, *args)

    @staticmethod
    def backward(ctx, grad):
        hidden = ctx.stored.to(ctx.device, non_blocking=True).requires_grad_(ctx.hidden_requires_grad)
        with torch.enable_grad():
            out = ctx.run(hidden, *ctx.args)
        torch.autograd.backward(out, grad)
        ctx.stored = None
        return (None, hidden.grad, None, *([None] * len(ctx.args)))


def offloaded_checkpoint(run, hidden: torch.Tensor, *args):
    """``run(hidden, *args)`` (one decoder layer) checkpointed with ``hidden`` kept on the CPU.
    Only ``hidden`` receives a gradient; the other arguments (masks, rotary tables) need none."""
    # An input that requires grad, so that the backward runs even when ``hidden`` does not (frozen
    # embeddings) and the layer's own parameters still get their gradients.
    anchor = torch.empty(0, device=hidden.device, requires_grad=True)
    return _OffloadedCheckpoint.apply(run, hidden, anchor, *args)


def offload_checkpoints(model) -> int:
    """Make the activation checkpointing of ``model``'s decoder layers (already enabled) keep the
    checkpoints on the CPU. Returns how many layers."""
    layers = model.model.layers
    if not all(getattr(layer, "gradient_checkpointing", False) for layer in layers):
        raise ValueError("offloading checkpoints needs activation checkpointing enabled first")
    for layer in layers:
        layer._gradient_checkpointing_func = offloaded_checkpoint
    return len(layers)
