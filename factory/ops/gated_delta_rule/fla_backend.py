"""flash-linear-attention kernels for CUDA tensors (imported only when a CUDA tensor arrives).

fla 0.6.0 refuses its gated backward on Hopper with Triton 3.4 to 3.7.0 (fla issue #640: a
codegen bug at one block size). Measured on an H100 with Triton 3.6 and the guard lifted, all
gradients matched the fp32 reference at bf16 level. We therefore lift the guard only after a
runtime self-check of forward and every gradient against the reference passes on this device;
if it fails we put the guard back and raise, never training on silently wrong gradients.
"""

from __future__ import annotations

import functools
import logging

import torch

from factory.ops.gated_delta_rule.naive import naive_chunk_gated_delta_rule

log = logging.getLogger(__name__)

SELF_CHECK_TOLERANCE = 0.02  # relative RMS error; bf16 kernels land near 0.005


def relative_rms_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    diff = (actual.float() - expected.float()).pow(2).mean().sqrt()
    return float(diff / expected.float().pow(2).mean().sqrt().clamp_min(1e-12))


def _fla():
    """fla's modules, imported on first use (the CPU path never gets here)."""
    try:
        import fla.modules.causal_conv1d as conv
        import fla.ops.common.chunk_o as chunk_o
        import fla.ops.gated_delta_rule as gdr
    except ImportError as err:
        raise ImportError("CUDA tensors need flash-linear-attention: pip install flash-linear-attention") from err
    return gdr, conv, chunk_o


def _self_check_inputs(device, head_dim: int, generator: torch.Generator):
    B, T, H = 1, 256, 2
    shape = (B, T, H, head_dim)
    q, k, v = (torch.randn(shape, device=device, generator=generator).bfloat16() for _ in range(3))
    g = torch.nn.functional.logsigmoid(torch.randn(B, T, H, device=device, generator=generator)).bfloat16()
    beta = torch.rand(B, T, H, device=device, generator=generator).bfloat16()
    h0 = torch.randn(B, H, head_dim, head_dim, device=device, generator=generator)
    return [t.requires_grad_() for t in (q, k, v, g, beta, h0)]


def _gradients(fn, inputs, generator):
    o, ht = fn(*inputs)
    do = torch.randn(o.shape, device=o.device, generator=generator)
    dht = torch.randn(ht.shape, device=o.device, generator=generator)
    grads = torch.autograd.grad((o.float() * do).sum() + (ht.float() * dht).sum(), inputs)
    return [o, ht, *grads]


def self_check(device: torch.device, head_dims: tuple[int, ...] = (64, 128)) -> dict[str, float]:
    """Compare fla's chunk kernel to the reference (outputs, final state, 6 gradients)."""
    chunk_gated_delta_rule = _fla()[0].chunk_gated_delta_rule
    errors = {}
    for head_dim in head_dims:
        gen = torch.Generator(device=device).manual_seed(head_dim)
        inputs = _self_check_inputs(device, head_dim, gen)

        def fused(q, k, v, g, beta, h0):
            return chunk_gated_delta_rule(q, k, v, g, beta, initial_state=h0, output_final_state=True,
                                          use_qk_l2norm_in_kernel=True)

        def reference(q, k, v, g, beta, h0):
            return naive_chunk_gated_delta_rule(q, k, v, g, beta, initial_state=h0,
                                                      output_final_state=True, use_qk_l2norm_in_kernel=True)

        got = _gradients(fused, inputs, torch.Generator(device=device).manual_seed(1))
        want = _gradients(reference, inputs, torch.Generator(device=device).manual_seed(1))
        names = ["o", "ht", "dq", "dk", "dv", "dg", "dbeta", "dh0"]
        for name, a, b in zip(names, got, want):
            errors[f"d{head_dim}/{name}"] = relative_rms_error(a, b)
    return errors


def _device(index: int) -> torch.device:
    return torch.device("cuda", index)


@functools.cache
def ensure_safe_backward(device_index: int, head_dim: int | None = None) -> None:
    """Lift fla's Hopper guard if, and only if, the kernels pass the self-check here, at the
    head dim in use (each checked dim costs a Triton compile at start-up); all dims if None."""
    chunk_o = _fla()[2]
    guarded = chunk_o.IS_NVIDIA_HOPPER and chunk_o.TRITON_ABOVE_3_4_0 and not chunk_o.TRITON_ABOVE_3_7_1
    if not guarded:
        return
    chunk_o.TRITON_ABOVE_3_7_1 = True
    dims = (head_dim,) if head_dim else (64, 128)
    # The first call can come inside an activation-checkpointed forward: own saved-tensor hooks keep
    # the check's tensors out of the checkpoint, whose recomputation would otherwise not match.
    with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t):
        errors = self_check(_device(device_index), dims)
    worst = max(errors, key=errors.get)
    if errors[worst] > SELF_CHECK_TOLERANCE:
        chunk_o.TRITON_ABOVE_3_7_1 = False
        raise RuntimeError(
            f"fla gated delta rule failed its self-check on this GPU with this Triton "
            f"({worst}: relative RMS error {errors[worst]:.4f} > {SELF_CHECK_TOLERANCE}); "
            "upgrade Triton to >= 3.7.1 or install tilelang")
    log.warning("fla Hopper guard lifted after a passing self-check (worst %s = %.4f)", worst, errors[worst])


def fla_chunk(q, k, v, g, beta, scale, initial_state, output_final_state, use_qk_l2norm, cu_seqlens, chunk_size):
    if torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v, g, beta)):
        ensure_safe_backward(q.device.index or 0, q.shape[-1])
    return _fla()[0].chunk_gated_delta_rule(
        q, k, v, g, beta, scale=scale, initial_state=initial_state, output_final_state=output_final_state,
        use_qk_l2norm_in_kernel=use_qk_l2norm, cu_seqlens=cu_seqlens, chunk_size=chunk_size)


def fla_recurrent(q, k, v, g, beta, scale, initial_state, output_final_state, use_qk_l2norm, cu_seqlens):
    return _fla()[0].fused_recurrent_gated_delta_rule(
        q, k, v, g=g, beta=beta, scale=scale, initial_state=initial_state,
        output_final_state=output_final_state, use_qk_l2norm_in_kernel=use_qk_l2norm, cu_seqlens=cu_seqlens)


def fla_conv(x, weight, initial_state, output_final_state, activation, cu_seqlens):
    return _fla()[1].causal_conv1d(x, weight=weight, initial_state=initial_state, output_final_state=output_final_state,
                         activation=activation, cu_seqlens=cu_seqlens)


def fla_gated_rms_norm(x, gate, weight, eps: float):
    """fla's fused ``rmsnorm(x) * weight * silu(gate)``."""
    try:
        from fla.modules.fused_norm_gate import rms_norm_gated
    except ImportError as err:
        raise ImportError("the fused gated RMSNorm needs flash-linear-attention") from err
    return rms_norm_gated(x, gate, weight, None, activation="swish", eps=eps)
