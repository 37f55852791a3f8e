"""AdamW, its parameter groups and the learning-rate schedule, shared by the local and DeepSpeed engines."""

from __future__ import annotations

import math

import torch

from factory.config.schema import OptimConfig


def lr_multiplier(step: int, total: int, cfg: OptimConfig) -> float:
    """Linear warmup, then cosine down to ``min_lr_ratio`` or constant."""
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return 1.0
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, total - cfg.warmup_steps))
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def param_groups(named_params, weight_decay: float) -> list[dict]:
    """No decay on biases, norms, and GDN's A_log / dt_bias."""
    decay, no_decay = [], []
    for _, p in named_params:
        (no_decay if p.ndim < 2 or getattr(p, "_no_weight_decay", False) else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def adamw(named_params, cfg: OptimConfig, offload: bool = False):
    """torch's AdamW over our parameter groups, or DeepSpeed's CPU AdamW (same update) when ZeRO-Offload
    steps the optimizer in CPU memory: DeepSpeed refuses a torch optimizer there."""
    groups = param_groups(named_params, cfg.weight_decay)
    if offload:
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        return DeepSpeedCPUAdam(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), adamw_mode=True)
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), fused=False)
