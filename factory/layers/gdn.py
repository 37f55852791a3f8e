"""Gated DeltaNet token mixer with flash-linear-attention's parameter names.

Single-device model code: no training logic, no process groups. Kernels come from
``factory.ops.gated_delta_rule`` (pure torch on CPU, fla on CUDA).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from factory.ops.gated_delta_rule import causal_conv1d, chunk_gated_delta_rule, recurrent_gated_delta_rule
from factory.ops.gated_delta_rule.fla_backend import fla_gated_rms_norm


@dataclass(frozen=True)
class GDNShape:
    hidden_size: int
    num_query_heads: int
    num_key_heads: int
    num_value_heads: int
    key_head_dim: int
    value_head_dim: int
    conv_size: int = 4
    allow_neg_eigval: bool = False
    norm_eps: float = 1e-6
    qk_channel_scale: bool = False

    @classmethod
    def from_config(cls, config) -> "GDNShape":
        return cls(
            hidden_size=config.hidden_size, num_query_heads=config.linear_num_query_heads,
            num_key_heads=config.linear_num_key_heads, num_value_heads=config.linear_num_value_heads,
            key_head_dim=config.linear_key_head_dim, value_head_dim=config.linear_value_head_dim,
            conv_size=config.linear_conv_kernel_dim, allow_neg_eigval=config.linear_allow_neg_eigval,
            norm_eps=config.rms_norm_eps, qk_channel_scale=config.linear_qk_channel_scale,
        )


class ShortConvolution(nn.Conv1d):
    """Depthwise causal conv whose weight ``[D, 1, W]`` matches fla's ShortConvolution."""

    def __init__(self, channels: int, kernel_size: int):
        super().__init__(channels, channels, kernel_size, groups=channels, bias=False, padding=kernel_size - 1)

    def forward(self, x: torch.Tensor, cu_seqlens: torch.Tensor | None = None, part: int = 0,
                parts: int = 1) -> torch.Tensor:
        """``x`` holds channel block ``part`` of ``parts`` (head-parallel sequence parallelism)."""
        rows = self.weight.shape[0] // parts
        weight = self.weight[part * rows:(part + 1) * rows].squeeze(1)
        y, _ = causal_conv1d(x, weight, activation="silu", cu_seqlens=cu_seqlens)
        return y


class GatedRMSNorm(nn.Module):
    """Per-head RMSNorm of the kernel output, gated by silu(g) (fla's FusedRMSNormGated).

    ``fused_on_cuda`` (class-wide, on) runs the same math on CUDA as fla's fused Triton kernel
    (one pass each way, fp32 inside) instead of the pure-torch form, which makes ~10 fp32 passes
    over a ``[T, heads * dv]`` tensor forward and more backward: on an H100 at Qwen3-32B shapes
    it took the layer's overhead over raw kernel + GEMMs from ~40% to ~10% (docs/PERFORMANCE.md).
    CPU always uses the pure-torch form, which is the reference the GPU tests compare against.
    """

    fused_on_cuda = True

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        if x.is_cuda and self.fused_on_cuda:
            return fla_gated_rms_norm(x, gate, self.weight, self.eps)
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (xf * self.weight.float() * F.silu(gate.float())).to(x.dtype)


class GatedDeltaNet(nn.Module):
    """A GDN token mixer. ``k_proj``/``v_proj`` hold ``num_key_heads``/``num_value_heads`` heads: the
    teacher's few K/V heads (``init.kv_heads=shared``, repeated to the query heads by the kernel
    dispatch) or one per query head (``expanded``). The kernels get the same shapes either way."""

    def __init__(self, shape: GDNShape, layer_idx: int | None = None):
        super().__init__()
        self.shape, self.layer_idx = shape, layer_idx
        s = shape
        H, dk, dv = s.num_query_heads, s.key_head_dim, s.value_head_dim
        self.q_proj = nn.Linear(s.hidden_size, H * dk, bias=False)
        self.k_proj = nn.Linear(s.hidden_size, s.num_key_heads * dk, bias=False)
        self.v_proj = nn.Linear(s.hidden_size, s.num_value_heads * dv, bias=False)
        self.a_proj = nn.Linear(s.hidden_size, H, bias=False)
        self.b_proj = nn.Linear(s.hidden_size, H, bias=False)
        self.g_proj = nn.Linear(s.hidden_size, H * dv, bias=False)
        self.o_proj = nn.Linear(H * dv, s.hidden_size, bias=False)
        self.A_log = nn.Parameter(torch.empty(H))
        self.dt_bias = nn.Parameter(torch.empty(H))
        self.A_log._no_weight_decay = self.dt_bias._no_weight_decay = True
        self.q_conv1d = ShortConvolution(H * dk, s.conv_size)
        self.k_conv1d = ShortConvolution(s.num_key_heads * dk, s.conv_size)
        self.v_conv1d = ShortConvolution(s.num_value_heads * dv, s.conv_size)
        self.o_norm = GatedRMSNorm(dv, s.norm_eps)
        if s.qk_channel_scale:
            # Qwen3's q_norm/k_norm weights kept as a per-channel scale (an initialization variant).
            self.q_scale = nn.Parameter(torch.ones(dk))
            self.k_scale = nn.Parameter(torch.ones(dk))
        self.reset_gate_parameters()

    @torch.no_grad()
    def reset_gate_parameters(self, generator: torch.Generator | None = None) -> None:
        """Mamba-2 style: A ~ U(0, 16), dt log-uniform in [1e-3, 1e-1], dt_bias = softplus^-1(dt)."""
        H = self.shape.num_query_heads
        A = torch.rand(H, generator=generator) * 16
        self.A_log.copy_(torch.log(A.clamp_min(1e-4)))
        dt = torch.exp(torch.rand(H, generator=generator) * (math.log(1e-1) - math.log(1e-3)) + math.log(1e-3))
        self.dt_bias.copy_(dt + torch.log(-torch.expm1(-dt)))

    @property
    def conv_channels(self) -> list[int]:
        return [c.in_channels for c in (self.q_conv1d, self.k_conv1d, self.v_conv1d)]

    def _convolve(self, x: torch.Tensor, cache, seq_len: int) -> list[torch.Tensor]:
        """q, k, v through their short convs, the cache's conv state (the last W inputs) first."""
        convs = (self.q_conv1d, self.k_conv1d, self.v_conv1d)
        mixed = torch.cat(x, dim=-1).transpose(1, 2)
        # Returns the cached history followed by these inputs; only the last W are kept.
        window = cache.update_conv_state(mixed, self.layer_idx, conv_kernel_size=self.shape.conv_size)
        parts = window.transpose(1, 2).split(self.conv_channels, dim=-1)
        return [conv(t)[:, -seq_len:] for conv, t in zip(convs, parts)]

    def mix_heads(self, q, k, v, a, b, cu_seqlens=None, part: int = 0, parts: int = 1) -> torch.Tensor:
        """Short convs and the kernel over whole rows for head block ``part`` of ``parts``.

        Inputs are the pre-conv projections of that block: q ``[B, T, H/parts * dk]``, k and v of
        its key/value heads, a and b ``[B, T, H/parts]``. Head-parallel sequence parallelism
        runs one block per rank; ``parts=1`` is the whole layer. Returns ``[B, T, H/parts, dv]``.
        """
        s = self.shape
        # Convs are called as modules so that sharded (ZeRO-3) weights are gathered by their hooks.
        q, k, v = (conv(x, cu_seqlens, part, parts)
                   for conv, x in zip((self.q_conv1d, self.k_conv1d, self.v_conv1d), (q, k, v)))
        B, T = q.shape[:2]
        q, k = q.view(B, T, -1, s.key_head_dim), k.view(B, T, -1, s.key_head_dim)
        v = v.view(B, T, -1, s.value_head_dim)
        if s.qk_channel_scale:
            q, k = q * self.q_scale, k * self.k_scale
        heads = slice(part * s.num_query_heads // parts, (part + 1) * s.num_query_heads // parts)
        o, _ = chunk_gated_delta_rule(
            q, k, v, a, b, use_qk_l2norm_in_kernel=True, use_gate_in_kernel=True, A_log=self.A_log[heads],
            dt_bias=self.dt_bias[heads], use_beta_sigmoid_in_kernel=True, allow_neg_eigval=s.allow_neg_eigval,
            cu_seqlens=cu_seqlens)
        return o

    def finish(self, o: torch.Tensor, hidden_states: torch.Tensor) -> torch.Tensor:
        """Gated per-head norm and output projection, ``o`` ``[B, T, H, dv]``."""
        B, T = o.shape[:2]
        gate = self.g_proj(hidden_states).view(B, T, -1, self.shape.value_head_dim)
        return self.o_proj(self.o_norm(o, gate).reshape(B, T, -1))

    def forward(
        self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None,
        cu_seqlens: torch.Tensor | None = None, past_key_values=None,
    ) -> torch.Tensor:
        """hidden_states ``[B, T, hidden]``; ``attention_mask`` a 2-D padding mask (left padding);
        ``cu_seqlens`` document boundaries of packed rows (B = 1); ``past_key_values`` a hybrid cache."""
        if cu_seqlens is not None and past_key_values is not None:
            raise ValueError("packed rows (cu_seqlens) cannot be combined with a decoding cache")
        if attention_mask is not None:
            # Zeroed padding writes nothing into conv or recurrent state.
            hidden_states = hidden_states * attention_mask[:, -hidden_states.shape[1]:, None].to(hidden_states.dtype)
        B, T, _ = hidden_states.shape
        s = self.shape
        projected = (self.q_proj(hidden_states), self.k_proj(hidden_states), self.v_proj(hidden_states))
        a, b = self.a_proj(hidden_states), self.b_proj(hidden_states)
        if past_key_values is None:
            return self.finish(self.mix_heads(*projected, a, b, cu_seqlens), hidden_states)
        cached = past_key_values.has_previous_state(self.layer_idx)
        q, k, v = self._convolve(projected, past_key_values, T)
        q = q.view(B, T, -1, s.key_head_dim)
        k = k.view(B, T, -1, s.key_head_dim)
        v = v.view(B, T, -1, s.value_head_dim)
        if s.qk_channel_scale:
            q, k = q * self.q_scale, k * self.k_scale
        state = past_key_values.layers[self.layer_idx].recurrent_states[0] if cached else None
        kernel = recurrent_gated_delta_rule if cached and T == 1 else chunk_gated_delta_rule
        kernel_kwargs = {} if kernel is recurrent_gated_delta_rule else {"chunk_size": 64}
        o, final_state = kernel(
            q, k, v, a, b, initial_state=state, output_final_state=True,
            use_qk_l2norm_in_kernel=True, use_gate_in_kernel=True, A_log=self.A_log, dt_bias=self.dt_bias,
            use_beta_sigmoid_in_kernel=True, allow_neg_eigval=s.allow_neg_eigval, **kernel_kwargs,
        )
        past_key_values.update_recurrent_state(final_state, self.layer_idx)
        return self.finish(o, hidden_states)
