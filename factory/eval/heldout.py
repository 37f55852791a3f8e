"""Held-out loss, teacher-student KL, parameter counts and KV-cache bytes per token."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from factory.data.packing import IGNORE_INDEX, PackedRows, model_inputs
from factory.distill.losses import forward_kl


@torch.no_grad()
def heldout_metrics(teacher, student, rows: PackedRows, max_rows: int, batch_size: int, device) -> dict:
    """Mean next-token loss of both models and mean forward KL(teacher || student) per token."""
    sums = {"teacher_loss": 0.0, "student_loss": 0.0, "kl": 0.0}
    count = 0
    n = min(len(rows), max_rows)
    for start in range(0, n, batch_size):
        batch = rows.batch(torch.arange(start, min(n, start + batch_size)))
        inputs = model_inputs(batch, device)
        labels = batch["labels"].to(device)
        valid = labels != IGNORE_INDEX
        logp_t = F.log_softmax(teacher(**inputs).logits[valid].float(), -1)
        logp_s = F.log_softmax(student(**inputs).logits[valid].float(), -1)
        y = labels[valid]
        sums["teacher_loss"] += float(F.nll_loss(logp_t, y, reduction="sum"))
        sums["student_loss"] += float(F.nll_loss(logp_s, y, reduction="sum"))
        sums["kl"] += float(forward_kl(logp_s, logp_t, log_probs=True))
        count += int(valid.sum())
    return {k: v / max(1, count) for k, v in sums.items()} | {"heldout_tokens": count}


def kv_cache_bytes_per_token(config, bytes_per_value: int = 2) -> int:
    """Keys and values of every attention layer (bf16 by default); GDN layers keep a fixed-size state."""
    types = getattr(config, "layer_types", None) or ["full_attention"] * config.num_hidden_layers
    attention_layers = sum(t == "full_attention" for t in types)
    return 2 * attention_layers * config.num_key_value_heads * config.head_dim * bytes_per_value


def recurrent_state_bytes(config, bytes_per_value: int = 4) -> int:
    """Per-sequence GDN state (fp32) plus conv windows, independent of context length."""
    linear = [i for i, t in enumerate(getattr(config, "layer_types", [])) if t == "linear_attention"]
    if not linear:
        return 0
    H, dk, dv = config.linear_num_query_heads, config.linear_key_head_dim, config.linear_value_head_dim
    conv = (H * dk + config.linear_num_key_heads * dk + config.linear_num_value_heads * dv) * \
        config.linear_conv_kernel_dim
    return len(linear) * (H * dk * dv + conv) * bytes_per_value


def parameter_count(model) -> int:
    """Whole-model count, also of a ZeRO-3 partitioned model (whose local tensors are empty)."""
    return sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters())
