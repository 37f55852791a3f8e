"""Which parameters of a hybrid train: a named set, everything else frozen."""

from __future__ import annotations

import torch

from factory.models.hqwen3.student import student_key

TRAINABLE_SETS = ("gdn", "gdn+norms", "gdn+norms+attention", "all")


def select_trainable(model, trainable: str) -> list[tuple[str, torch.nn.Parameter]]:
    """Freeze everything, then unfreeze the named set. Kept teacher attention never trains."""
    if trainable not in TRAINABLE_SETS:
        raise ValueError(f"trainable '{trainable}' is not one of {TRAINABLE_SETS}")
    model.requires_grad_(False)
    chosen = []
    for name, p in model.named_parameters():
        if not student_key(model.config, name):
            continue
        gdn = ".linear_attn." in name
        norm = trainable.startswith("gdn+norms") and "norm" in name
        attention = trainable == "gdn+norms+attention" and ".self_attn." in name
        if trainable == "all" or gdn or norm or attention:
            p.requires_grad_(True)
            chosen.append((name, p))
    return chosen
