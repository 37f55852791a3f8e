"""Gated delta rule behind one API; the kernel is chosen by the tensors' device.

CPU tensors run the pure-torch reference in ``naive.py`` (no fla import on that path: fla
needs triton to import and every fla kernel fails on CPU). CUDA tensors run
flash-linear-attention's kernels. Both take fla's layout and argument names.

Head repetition happens here, so callers may pass fewer key/value heads than query heads
(GQA-style, as a primed Qwen3 layer keeps the teacher's 8 KV heads), or as many
(``init.kv_heads=expanded``): after repetition fla and the reference see the same shapes.
"""

from __future__ import annotations

import torch

from factory.ops.gated_delta_rule.fla_backend import fla_chunk, fla_conv, fla_recurrent
from factory.ops.gated_delta_rule.naive import (
    gdn_beta, gdn_gate, l2norm, naive_causal_conv1d, naive_chunk_gated_delta_rule,
    naive_recurrent_gated_delta_rule, repeat_heads)

__all__ = [
    "chunk_gated_delta_rule", "recurrent_gated_delta_rule", "causal_conv1d",
    "gdn_gate", "gdn_beta", "l2norm", "repeat_heads",
]


def _gate_and_beta(g, beta, A_log, dt_bias, use_gate_in_kernel, use_beta_sigmoid_in_kernel, allow_neg_eigval):
    if use_gate_in_kernel:
        if A_log is None or dt_bias is None:
            raise ValueError("use_gate_in_kernel=True needs A_log and dt_bias")
        g = gdn_gate(g, A_log, dt_bias)
    if use_beta_sigmoid_in_kernel:
        beta = gdn_beta(beta, allow_neg_eigval)
    return g, beta


def _expand_heads(q, k, v, heads):
    """q and k to the same head count, v to the gate's head count (fla's GVA needs HV % H == 0)."""
    qk_heads = max(q.shape[2], k.shape[2])
    return repeat_heads(q, qk_heads), repeat_heads(k, qk_heads), repeat_heads(v, heads)


def chunk_gated_delta_rule(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, beta: torch.Tensor,
    scale: float | None = None, initial_state: torch.Tensor | None = None,
    output_final_state: bool = False, use_qk_l2norm_in_kernel: bool = True,
    use_gate_in_kernel: bool = False, A_log: torch.Tensor | None = None, dt_bias: torch.Tensor | None = None,
    use_beta_sigmoid_in_kernel: bool = False, allow_neg_eigval: bool = False,
    cu_seqlens: torch.LongTensor | None = None, chunk_size: int = 64,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Chunked gated delta rule (training, prefill). Returns ``(o [B,T,HV,V], final_state)``.

    ``g``/``beta`` are log decay and post-sigmoid strength, or raw ``a``/``b`` projections when
    ``use_gate_in_kernel`` / ``use_beta_sigmoid_in_kernel`` are set.
    """
    g, beta = _gate_and_beta(g, beta, A_log, dt_bias, use_gate_in_kernel, use_beta_sigmoid_in_kernel, allow_neg_eigval)
    q, k, v = _expand_heads(q, k, v, g.shape[2])
    if q.is_cuda:
        return fla_chunk(q, k, v, g, beta, scale, initial_state, output_final_state,
                         use_qk_l2norm_in_kernel, cu_seqlens, chunk_size)
    return naive_chunk_gated_delta_rule(
        q, k, v, g, beta, scale, initial_state, output_final_state, use_qk_l2norm_in_kernel, cu_seqlens, chunk_size)


def recurrent_gated_delta_rule(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, beta: torch.Tensor,
    scale: float | None = None, initial_state: torch.Tensor | None = None,
    output_final_state: bool = False, use_qk_l2norm_in_kernel: bool = True,
    use_gate_in_kernel: bool = False, A_log: torch.Tensor | None = None, dt_bias: torch.Tensor | None = None,
    use_beta_sigmoid_in_kernel: bool = False, allow_neg_eigval: bool = False,
    cu_seqlens: torch.LongTensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Token-by-token gated delta rule (decoding). Same arguments as the chunked form."""
    g, beta = _gate_and_beta(g, beta, A_log, dt_bias, use_gate_in_kernel, use_beta_sigmoid_in_kernel, allow_neg_eigval)
    q, k, v = _expand_heads(q, k, v, g.shape[2])
    if q.is_cuda:
        return fla_recurrent(q, k, v, g, beta, scale, initial_state, output_final_state,
                             use_qk_l2norm_in_kernel, cu_seqlens)
    return naive_recurrent_gated_delta_rule(
        q, k, v, g, beta, scale, initial_state, output_final_state, use_qk_l2norm_in_kernel, cu_seqlens)


def causal_conv1d(
    x: torch.Tensor, weight: torch.Tensor, initial_state: torch.Tensor | None = None,
    output_final_state: bool = False, activation: str | None = "silu",
    cu_seqlens: torch.LongTensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Short depthwise causal conv, x ``[B,T,D]``, weight ``[D,W]``, state ``[N,D,W]``."""
    if x.is_cuda:
        return fla_conv(x, weight, initial_state, output_final_state, activation, cu_seqlens)
    return naive_causal_conv1d(x, weight, initial_state, output_final_state, activation, cu_seqlens)
