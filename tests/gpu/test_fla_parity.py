"""fla's kernels (the CUDA path) against our pure-torch reference, on the GPU.

Each test feeds bf16 inputs to the public dispatch in ``factory.ops.gated_delta_rule`` (which
runs fla on CUDA tensors) and the same CUDA tensors, upcast to fp32, to the reference functions
in ``naive.py``; outputs, final states and every gradient must agree to a relative RMS error of
``TOL`` (bf16 kernels land near 0.005). Errors are printed (run pytest with ``-s``) and, when
``FLA_PARITY_JSON`` names a file, written there at the end of the module.
"""

from __future__ import annotations

import copy
import json
import os

import pytest
import torch
import torch.nn.functional as F

from factory.ops.gated_delta_rule import causal_conv1d, chunk_gated_delta_rule, recurrent_gated_delta_rule
from factory.ops.gated_delta_rule.naive import (
    naive_causal_conv1d, naive_chunk_gated_delta_rule, naive_recurrent_gated_delta_rule)

TOL = 0.02
_ERRORS: dict[str, dict[str, float]] = {}
# Packed rows: several documents of odd lengths (one shorter than the conv width).
PACKED = [0, 37, 200, 263, 500]
CONV_PACKED = [0, 3, 40, 41, 100]


def rel_rms(actual: torch.Tensor, expected: torch.Tensor) -> float:
    from factory.ops.gated_delta_rule.fla_backend import relative_rms_error

    return relative_rms_error(actual.detach(), expected.detach())


@pytest.fixture(scope="module", autouse=True)
def _report():
    yield
    if not _ERRORS:
        return
    worst = max(((test, name, err) for test, errs in _ERRORS.items() for name, err in errs.items()),
                key=lambda item: item[2])
    print(f"\n[parity] worst relative RMS error over the module: {worst[2]:.5f} ({worst[0]} / {worst[1]})")
    path = os.environ.get("FLA_PARITY_JSON")
    if path:
        with open(path, "w") as f:
            json.dump({"tolerance": TOL, "worst": {"test": worst[0], "name": worst[1], "error": worst[2]},
                       "errors": _ERRORS}, f, indent=1, sort_keys=True)


@pytest.fixture
def check(request):
    """check(names, got, want, tol=TOL): record each relative RMS error, then assert all are <= tol."""

    def record(errors):
        _ERRORS[request.node.name] = {**_ERRORS.get(request.node.name, {}), **errors}
        print(f"\n[parity] {request.node.name}: " + ", ".join(f"{k}={v:.5f}" for k, v in errors.items()))

    def _check(names, got, want, tol=TOL):
        errors = {name: rel_rms(a, b) for name, a, b in zip(names, got, want, strict=True)}
        record(errors)
        bad = {k: v for k, v in errors.items() if not v <= tol}
        assert not bad, f"relative RMS error above {tol}: {bad} (all: {errors})"
        return errors

    _check.record = record
    return _check


def _randn(*shape, gen, dtype=torch.bfloat16):
    return torch.randn(*shape, device="cuda", generator=gen).to(dtype)


def _reference_leaves(tensors):
    """fp32 copies of the bf16 leaves: the reference runs on the same values, upcast."""
    return [t.detach().float().requires_grad_() for t in tensors]


def _grads(outputs, inputs, seed):
    """Gradients of sum(out_i * R_i) for fixed random R_i (the same for fla and the reference)."""
    gen = torch.Generator(device="cuda").manual_seed(seed)
    loss = sum((o.float() * torch.randn(o.shape, device="cuda", generator=gen)).sum() for o in outputs)
    return list(torch.autograd.grad(loss, inputs))


# --------------------------------------------------------------------------- the Hopper guard

@pytest.mark.gpu
def test_hopper_guard_lifted_only_after_a_passing_self_check(check):
    import fla.ops.common.chunk_o as chunk_o
    import fla.utils as fla_utils

    from factory.ops.gated_delta_rule import fla_backend

    needed = bool(chunk_o.IS_NVIDIA_HOPPER and chunk_o.TRITON_ABOVE_3_4_0 and not fla_utils.TRITON_ABOVE_3_7_1)
    print(f"\n[parity] fla Hopper guard needed on this GPU/Triton: {needed} "
          f"(hopper={chunk_o.IS_NVIDIA_HOPPER}, triton>=3.7.1={fla_utils.TRITON_ABOVE_3_7_1})")
    fla_backend.ensure_safe_backward(torch.cuda.current_device())
    if needed:
        assert chunk_o.TRITON_ABOVE_3_7_1, "ensure_safe_backward returned but left fla's guard in place"
    else:
        assert chunk_o.TRITON_ABOVE_3_7_1 == fla_utils.TRITON_ABOVE_3_7_1, "guard touched although not needed"
    errors = fla_backend.self_check(torch.device("cuda", torch.cuda.current_device()))
    assert len(errors) == 16  # 2 head dims x (o, final state, 6 gradients)
    check.record({f"self_check/{k}": v for k, v in errors.items()})
    assert max(errors.values()) <= fla_backend.SELF_CHECK_TOLERANCE, errors


@pytest.mark.gpu
def test_guard_raises_loudly_when_the_self_check_fails(monkeypatch):
    import fla.ops.common.chunk_o as chunk_o

    from factory.ops.gated_delta_rule import fla_backend

    # Pretend the guard applies (it does on an H100 with Triton 3.6) and the kernels are wrong.
    monkeypatch.setattr(chunk_o, "IS_NVIDIA_HOPPER", True)
    monkeypatch.setattr(chunk_o, "TRITON_ABOVE_3_4_0", True)
    monkeypatch.setattr(chunk_o, "TRITON_ABOVE_3_7_1", False)
    monkeypatch.setattr(fla_backend, "self_check", lambda device, dims=(64, 128): {"d64/o": 0.001, "d128/dq": 0.5})
    fla_backend.ensure_safe_backward.cache_clear()
    try:
        with pytest.raises(RuntimeError, match=r"failed its self-check.*d128/dq.*0\.5000"):
            fla_backend.ensure_safe_backward(torch.cuda.current_device())
        assert chunk_o.TRITON_ABOVE_3_7_1 is False, "the guard must be put back after a failed self-check"
        # The public entry point refuses too (no silent training on wrong gradients) ...
        gen = torch.Generator(device="cuda").manual_seed(0)
        q, k, v = (_randn(1, 64, 2, 64, gen=gen).requires_grad_() for _ in range(3))
        g = F.logsigmoid(_randn(1, 64, 2, gen=gen, dtype=torch.float32)).requires_grad_()
        beta = torch.rand(1, 64, 2, device="cuda", generator=gen).requires_grad_()
        with pytest.raises(RuntimeError, match="self-check"):
            chunk_gated_delta_rule(q, k, v, g, beta, use_qk_l2norm_in_kernel=True)
        # ... while inference (no gradients) needs no self-check.
        with torch.no_grad():
            o, _ = chunk_gated_delta_rule(q, k, v, g, beta, use_qk_l2norm_in_kernel=True)
        assert torch.isfinite(o).all()
    finally:
        fla_backend.ensure_safe_backward.cache_clear()


# --------------------------------------------------------------------------- chunked kernel

# Two (expanded) heads throughout, as in fla_backend.self_check: every distinct head count, head
# dim and dtype is a fresh Triton compile and autotune of each fla kernel (minutes on an H100).
CHUNK_CASES = {
    # name: (batch, cu_seqlens, query heads, key heads, value heads)
    "unpacked": (2, None, 2, 1, 1),
    "packed": (1, PACKED, 2, 1, 2),
}


@pytest.mark.gpu
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("case", list(CHUNK_CASES))
def test_chunk_forward_and_all_gradients_match_reference(case, head_dim, check):
    B, cu, H, HK, HV = CHUNK_CASES[case]
    T = 300 if cu is None else cu[-1]
    N = B if cu is None else len(cu) - 1
    cu_seqlens = None if cu is None else torch.tensor(cu, device="cuda", dtype=torch.long)
    gen = torch.Generator(device="cuda").manual_seed(head_dim + len(case))
    K = V = head_dim
    q = _randn(B, T, H, K, gen=gen)
    k = _randn(B, T, HK, K, gen=gen)
    v = _randn(B, T, HV, V, gen=gen)
    g = F.logsigmoid(_randn(B, T, H, gen=gen, dtype=torch.float32) + 2).bfloat16()
    beta = torch.rand(B, T, H, device="cuda", generator=gen).bfloat16()
    h0 = _randn(N, H, K, V, gen=gen, dtype=torch.float32)
    ours = [t.requires_grad_() for t in (q, k, v, g, beta, h0)]
    ref = _reference_leaves(ours)

    o, ht = chunk_gated_delta_rule(*ours[:5], initial_state=ours[5], output_final_state=True,
                                   use_qk_l2norm_in_kernel=True, cu_seqlens=cu_seqlens)
    o_ref, ht_ref = naive_chunk_gated_delta_rule(*ref[:5], initial_state=ref[5], output_final_state=True,
                                                 use_qk_l2norm_in_kernel=True, cu_seqlens=cu_seqlens)
    assert o.dtype == torch.bfloat16 and o.shape == (B, T, H, V) and ht.shape == (N, H, K, V)
    got = [o, ht, *_grads([o, ht], ours, seed=1)]
    want = [o_ref, ht_ref, *_grads([o_ref, ht_ref], ref, seed=1)]
    check(["o", "final_state", "dq", "dk", "dv", "dg", "dbeta", "dh0"], got, want)


# --------------------------------------------------------------------------- decoding

@pytest.mark.gpu
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("case", ["decode_step", "packed_steps"])
def test_recurrent_decode_with_initial_state_matches_reference(case, head_dim, check):
    # decode_step: one new token for each of 3 sequences; packed_steps: 3 sequences of 1, 3, 2 tokens.
    B, T, cu = (3, 1, None) if case == "decode_step" else (1, 6, [0, 1, 4, 6])
    N = B if cu is None else len(cu) - 1
    cu_seqlens = None if cu is None else torch.tensor(cu, device="cuda", dtype=torch.long)
    H, HK, HV, K = 2, 1, 1, head_dim
    gen = torch.Generator(device="cuda").manual_seed(10 + head_dim)
    q, k, v = _randn(B, T, H, K, gen=gen), _randn(B, T, HK, K, gen=gen), _randn(B, T, HV, K, gen=gen)
    g = F.logsigmoid(_randn(B, T, H, gen=gen, dtype=torch.float32) + 2).bfloat16()
    beta = torch.rand(B, T, H, device="cuda", generator=gen).bfloat16()
    h0 = _randn(N, H, K, K, gen=gen, dtype=torch.float32)
    with torch.no_grad():
        o, ht = recurrent_gated_delta_rule(q, k, v, g, beta, initial_state=h0, output_final_state=True,
                                           use_qk_l2norm_in_kernel=True, cu_seqlens=cu_seqlens)
        o_ref, ht_ref = naive_recurrent_gated_delta_rule(
            *(t.float() for t in (q, k, v, g, beta)), initial_state=h0, output_final_state=True,
            use_qk_l2norm_in_kernel=True, cu_seqlens=cu_seqlens)
        # The chunked kernel, continuing from the same state, agrees with the step kernel.
        o_chunk, ht_chunk = chunk_gated_delta_rule(q, k, v, g, beta, initial_state=h0, output_final_state=True,
                                                   use_qk_l2norm_in_kernel=True, cu_seqlens=cu_seqlens)
    check(["o", "final_state", "o_chunk", "final_state_chunk"], [o, ht, o_chunk, ht_chunk],
          [o_ref, ht_ref, o_ref, ht_ref])


# --------------------------------------------------------------------------- causal conv

@pytest.mark.gpu
@pytest.mark.parametrize("case", ["unpacked", "packed"])
def test_causal_conv_with_states_and_gradients_matches_reference(case, check):
    D, W = 192, 4
    B, T, cu = (2, 50, None) if case == "unpacked" else (1, CONV_PACKED[-1], CONV_PACKED)
    N = B if cu is None else len(cu) - 1
    cu_seqlens = None if cu is None else torch.tensor(cu, device="cuda", dtype=torch.long)
    gen = torch.Generator(device="cuda").manual_seed(20)
    x = _randn(B, T, D, gen=gen)
    weight = (_randn(D, W, gen=gen, dtype=torch.float32) / W**0.5).bfloat16()
    h0 = _randn(N, D, W, gen=gen)
    ours = [t.requires_grad_() for t in (x, weight, h0)]
    ref = _reference_leaves(ours)
    y, final = causal_conv1d(ours[0], ours[1], initial_state=ours[2], output_final_state=True,
                             activation="silu", cu_seqlens=cu_seqlens)
    y_ref, final_ref = naive_causal_conv1d(ref[0], ref[1], initial_state=ref[2], output_final_state=True,
                                           activation="silu", cu_seqlens=cu_seqlens)
    assert y.shape == (B, T, D) and final.shape == (N, D, W)
    # Training never differentiates the conv's final state (it feeds decoding only): loss on y alone.
    got = [y, final, *_grads([y], ours, seed=2)]
    want = [y_ref, final_ref, *_grads([y_ref], ref, seed=2)]
    check(["y", "final_state", "dx", "dweight", "dh0"], got, want)


# --------------------------------------------------------------------------- gated RMSNorm

@pytest.mark.gpu
def test_fused_gated_rmsnorm_matches_torch_form(check, monkeypatch):
    from factory.layers.gdn import GatedRMSNorm

    monkeypatch.setattr(GatedRMSNorm, "fused_on_cuda", True)  # fla's fused kernel (the CUDA default)
    gen = torch.Generator(device="cuda").manual_seed(30)
    norm = GatedRMSNorm(128, eps=1e-6).cuda().bfloat16()
    with torch.no_grad():
        norm.weight.copy_(1 + 0.2 * _randn(128, gen=gen, dtype=torch.float32))
    x, gate = (_randn(2, 50, 4, 128, gen=gen).requires_grad_() for _ in range(2))
    ref = _reference_leaves([x, gate, norm.weight])

    y = norm(x, gate)
    xf = ref[0] * torch.rsqrt(ref[0].pow(2).mean(-1, keepdim=True) + 1e-6)
    y_ref = xf * ref[2] * F.silu(ref[1])
    assert y.dtype == torch.bfloat16
    check(["y", "dx", "dgate", "dweight"], [y, *_grads([y], [x, gate, norm.weight], seed=3)],
          [y_ref, *_grads([y_ref], ref, seed=3)])


# --------------------------------------------------------------------------- the whole layer

def _layer_pair(head_dim, seed=0, kv_heads=1):
    """The same GatedDeltaNet twice: fp32 on CPU (reference math) and bf16 on CUDA (fla). ``kv_heads=2``
    is init.kv_heads=expanded (one K/V head per query head): the kernels get the same shapes."""
    from factory.layers.gdn import GatedDeltaNet, GDNShape

    torch.manual_seed(seed)
    shape = GDNShape(hidden_size=256, num_query_heads=2, num_key_heads=kv_heads, num_value_heads=kv_heads,
                     key_head_dim=head_dim, value_head_dim=head_dim)
    cpu = GatedDeltaNet(shape, layer_idx=0)
    with torch.no_grad():
        cpu.A_log.normal_(0, 0.5)  # random gates, so the layer really mixes tokens
        cpu.o_norm.weight.normal_(1, 0.2)
        for p in cpu.parameters():  # bf16-representable weights: both copies hold identical values
            p.copy_(p.bfloat16().float())
    return cpu, copy.deepcopy(cpu).cuda().bfloat16()


@pytest.mark.gpu
@pytest.mark.parametrize("head_dim,packed,fused_norm,kv_heads", [
    (64, False, True, 1), (64, True, True, 1), (128, False, True, 1), (128, True, True, 1), (128, True, False, 1),
    (128, True, True, 2)],
    ids=["unpacked-64", "packed-64", "unpacked-128", "packed-128", "packed-128-torch_norm", "packed-128-expanded_kv"])
def test_gdn_layer_on_cuda_matches_cpu_reference(head_dim, packed, fused_norm, kv_heads, check, monkeypatch):
    from factory.layers.gdn import GatedRMSNorm

    monkeypatch.setattr(GatedRMSNorm, "fused_on_cuda", fused_norm)
    cpu, gpu = _layer_pair(head_dim, kv_heads=kv_heads)
    B, T = (1, PACKED[-1]) if packed else (2, 200)
    x = torch.randn(B, T, 256, generator=torch.Generator().manual_seed(head_dim)).bfloat16()
    cu = torch.tensor(PACKED, dtype=torch.long) if packed else None
    x_cpu = x.float().requires_grad_()
    x_gpu = x.cuda().requires_grad_()
    y_cpu = cpu(x_cpu, cu_seqlens=cu)
    y_gpu = gpu(x_gpu, cu_seqlens=None if cu is None else cu.cuda())
    assert y_gpu.dtype == torch.bfloat16
    dy = torch.randn(y_cpu.shape, generator=torch.Generator().manual_seed(4))
    (y_cpu * dy).sum().backward()
    (y_gpu.float() * dy.cuda()).sum().backward()
    names = ["y", "dx"] + [f"d{n}" for n, _ in cpu.named_parameters()]
    got = [y_gpu.cpu(), x_gpu.grad.cpu()] + [p.grad.cpu() for _, p in gpu.named_parameters()]
    want = [y_cpu, x_cpu.grad] + [p.grad for _, p in cpu.named_parameters()]
    check(names, got, want)


@pytest.mark.gpu
def test_hqwen3_prefill_and_cached_decode_on_cuda_match_cpu(check):
    from tests.helpers import tiny_hybrid

    cpu = tiny_hybrid(seed=3, linear_num_query_heads=2, linear_num_key_heads=1, linear_num_value_heads=1,
                      linear_key_head_dim=64, linear_value_head_dim=64)
    with torch.no_grad():
        for p in cpu.parameters():
            p.copy_(p.bfloat16().float())
    gpu = copy.deepcopy(cpu).cuda()
    with torch.no_grad():
        for p in gpu.parameters():  # weights to bf16; buffers (RoPE inv_freq) stay fp32 as on CPU
            p.data = p.data.bfloat16()
    gen = torch.Generator().manual_seed(5)
    lengths = [7, 20, 1, 12]
    packed = torch.randint(1, 101, (1, sum(lengths)), generator=gen)
    position_ids = torch.cat([torch.arange(n) for n in lengths]).unsqueeze(0)
    prompt = torch.randint(1, 101, (2, 19), generator=gen)
    steps = torch.randint(1, 101, (2, 3), generator=gen)

    def run(model, device):
        with torch.no_grad():
            out = [model(packed.to(device), position_ids=position_ids.to(device), use_cache=False).logits]
            res = model(prompt.to(device), use_cache=True)
            out.append(res.logits)
            cache = res.past_key_values
            for i in range(steps.shape[1]):  # one token at a time: the recurrent kernel with a cache
                res = model(steps[:, i:i + 1].to(device), past_key_values=cache, use_cache=True)
                cache = res.past_key_values
                out.append(res.logits)
        return [t.float().cpu() for t in out]

    names = ["packed_prefill", "prefill"] + [f"decode_{i}" for i in range(steps.shape[1])]
    check(names, run(gpu, "cuda"), run(cpu, "cpu"))
