"""Switch a hybrid's decoder layers to activation checkpointing (``factory.layers.checkpoint``)."""

from __future__ import annotations

from functools import partial

from factory.layers.checkpoint import checkpoint


def enable_activation_checkpointing(model, offload: bool = False) -> int:
    """Checkpoint every decoder layer of ``model`` (a causal LM), with the kept layer inputs in CPU
    memory when ``offload``. Instead of ``gradient_checkpointing_enable`` (torch's non-reentrant
    checkpoint; see ``factory.layers.checkpoint`` for why). Returns how many layers."""
    layers = model.model.layers
    for layer in layers:
        layer.gradient_checkpointing = True
        layer._gradient_checkpointing_func = partial(checkpoint, offload=offload)
    return len(layers)
