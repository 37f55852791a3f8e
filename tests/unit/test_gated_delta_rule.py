"""The pure-torch reference against an independent implementation and against itself."""

import pytest
import torch
import torch.nn.functional as F

from factory.ops.gated_delta_rule import (
    causal_conv1d, chunk_gated_delta_rule, recurrent_gated_delta_rule, repeat_heads)


def transformers_reference():
    # Qwen3-Next's pure-torch kernel: written independently of ours.
    from transformers.models.qwen3_next.modeling_qwen3_next import torch_chunk_gated_delta_rule
    return torch_chunk_gated_delta_rule


def make_inputs(T, B=2, H=4, HK=2, K=16, V=8, seed=0, requires_grad=True):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(B, T, H, K, generator=gen, dtype=torch.float64)
    k = torch.randn(B, T, HK, K, generator=gen, dtype=torch.float64)
    v = torch.randn(B, T, HK, V, generator=gen, dtype=torch.float64)
    g = F.logsigmoid(torch.randn(B, T, H, generator=gen, dtype=torch.float64) + 2)
    beta = torch.rand(B, T, H, generator=gen, dtype=torch.float64)
    h0 = torch.randn(B, H, K, V, generator=gen, dtype=torch.float64)
    return [t.requires_grad_(requires_grad) for t in (q, k, v, g, beta, h0)]


def run_and_grads(fn, inputs, seed=1):
    o, ht = fn(*inputs)
    gen = torch.Generator().manual_seed(seed)
    loss = (o.double() * torch.randn(o.shape, generator=gen, dtype=torch.float64)).sum()
    loss = loss + (ht.double() * torch.randn(ht.shape, generator=gen, dtype=torch.float64)).sum()
    grads = torch.autograd.grad(loss, inputs)
    return [o.detach(), ht.detach(), *grads]


def ours(chunk_size=64):
    def fn(q, k, v, g, beta, h0):
        return chunk_gated_delta_rule(q, k, v, g, beta, initial_state=h0, output_final_state=True,
                                      use_qk_l2norm_in_kernel=True, chunk_size=chunk_size)
    return fn


def theirs(q, k, v, g, beta, h0):
    heads = g.shape[2]
    o, ht = transformers_reference()(repeat_heads(q, heads), repeat_heads(k, heads), repeat_heads(v, heads),
                                     g, beta, initial_state=h0, output_final_state=True,
                                     use_qk_l2norm_in_kernel=True)
    return o, ht


def assert_all_close(got, want, atol=1e-5, rtol=1e-4):
    names = ["o", "final_state", "dq", "dk", "dv", "dg", "dbeta", "dh0"]
    for name, a, b in zip(names, got, want):
        torch.testing.assert_close(a.double(), b.double(), atol=atol, rtol=rtol, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("HK", [2, 4], ids=["shared_kv", "expanded_kv"])  # init.kv_heads: 2 repeated or 4 own
@pytest.mark.parametrize("T", [1, 63, 65, 500])
def test_chunk_matches_transformers_reference(T, HK):
    inputs = make_inputs(T, HK=HK)
    assert_all_close(run_and_grads(ours(), inputs), run_and_grads(theirs, inputs))


@pytest.mark.parametrize("chunk_size", [16, 32, 64])
@pytest.mark.parametrize("T", [1, 65, 130])
def test_chunk_matches_recurrent(T, chunk_size):
    inputs = make_inputs(T, seed=T)

    def recurrent(q, k, v, g, beta, h0):
        return recurrent_gated_delta_rule(q, k, v, g, beta, initial_state=h0, output_final_state=True,
                                          use_qk_l2norm_in_kernel=True)
    assert_all_close(run_and_grads(ours(chunk_size), inputs), run_and_grads(recurrent, inputs))


def test_fp32_accumulation_for_bf16_inputs():
    q, k, v, g, beta, h0 = make_inputs(100, requires_grad=False)
    o16, _ = chunk_gated_delta_rule(q.bfloat16(), k.bfloat16(), v.bfloat16(), g.bfloat16(), beta.bfloat16())
    o64, _ = chunk_gated_delta_rule(*(t.bfloat16().double() for t in (q, k, v, g, beta)))
    assert o16.dtype == torch.bfloat16
    torch.testing.assert_close(o16.double(), o64, atol=2e-2, rtol=2e-2)


def test_gate_and_beta_in_kernel_match_precomputed():
    q, k, v, _, _, _ = make_inputs(40, requires_grad=False)
    gen = torch.Generator().manual_seed(3)
    a, b = torch.randn(2, 40, 4, generator=gen).double(), torch.randn(2, 40, 4, generator=gen).double()
    A_log, dt_bias = torch.rand(4, generator=gen).double() * 2, torch.randn(4, generator=gen).double()
    fused, _ = chunk_gated_delta_rule(q, k, v, a, b, use_gate_in_kernel=True, A_log=A_log, dt_bias=dt_bias,
                                      use_beta_sigmoid_in_kernel=True, allow_neg_eigval=True)
    g = -A_log.exp() * F.softplus(a + dt_bias)
    manual, _ = chunk_gated_delta_rule(q, k, v, g, 2 * b.sigmoid())
    torch.testing.assert_close(fused, manual, atol=1e-5, rtol=1e-5)  # the gate is computed in fp32


@pytest.mark.parametrize("mode", ["chunk", "recurrent"])
def test_packed_rows_equal_each_document_alone(mode):
    lengths = [5, 70, 1, 33]
    q, k, v, g, beta, _ = make_inputs(sum(lengths), B=1, requires_grad=False)
    h0 = torch.randn(len(lengths), 4, 16, 8, dtype=torch.float64)
    cu = torch.tensor([0] + lengths).cumsum(0)
    fn = chunk_gated_delta_rule if mode == "chunk" else recurrent_gated_delta_rule
    packed, packed_state = fn(q, k, v, g, beta, initial_state=h0, output_final_state=True, cu_seqlens=cu)
    for i in range(len(lengths)):
        s, e = cu[i], cu[i + 1]
        alone, state = fn(q[:, s:e], k[:, s:e], v[:, s:e], g[:, s:e], beta[:, s:e], initial_state=h0[i:i + 1],
                          output_final_state=True)
        torch.testing.assert_close(packed[:, s:e], alone)
        torch.testing.assert_close(packed_state[i:i + 1], state)


# Without states, packed documents run side by side in lanes and restart inside chunks: rows as the
# data loader packs them (every lane full), and documents that leave padding at lanes' ends.
@pytest.mark.parametrize("lengths", [[20, 44, 64, 7, 57], [5, 70, 1, 33, 20, 16]], ids=["rows", "ragged"])
def test_packed_rows_without_states_equal_each_document_alone_with_grads(lengths):
    q, k, v, g, beta, _ = make_inputs(sum(lengths), B=1)
    cu = torch.tensor([0] + lengths).cumsum(0)

    def grads_of(outputs, inputs, seed):
        gen = torch.Generator().manual_seed(seed)
        loss = sum((o * torch.randn(o.shape, generator=gen, dtype=o.dtype)).sum() for o in outputs)
        return torch.autograd.grad(loss, inputs)

    inputs = (q, k, v, g, beta)
    packed, state = chunk_gated_delta_rule(*inputs, cu_seqlens=cu, chunk_size=16)
    assert state is None
    alone = [chunk_gated_delta_rule(*(t[:, s:e] for t in inputs), chunk_size=16)[0] for s, e in zip(cu[:-1], cu[1:])]
    torch.testing.assert_close(packed, torch.cat(alone, dim=1), atol=1e-6, rtol=1e-5)  # fp32 inside
    for got, want in zip(grads_of([packed], inputs, 5), grads_of([torch.cat(alone, dim=1)], inputs, 5)):
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)


def test_prefill_then_decode_equals_one_pass():
    q, k, v, g, beta, _ = make_inputs(50, requires_grad=False)
    full, _ = chunk_gated_delta_rule(q, k, v, g, beta)
    head, state = chunk_gated_delta_rule(q[:, :30], k[:, :30], v[:, :30], g[:, :30], beta[:, :30],
                                         output_final_state=True)
    steps = [head]
    for t in range(30, 50):
        o, state = recurrent_gated_delta_rule(q[:, t:t + 1], k[:, t:t + 1], v[:, t:t + 1], g[:, t:t + 1],
                                              beta[:, t:t + 1], initial_state=state, output_final_state=True)
        steps.append(o)
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-6, rtol=1e-5)  # fp32 inside


def test_causal_conv_state_and_packing():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(1, 20, 6, generator=gen)
    w = torch.randn(6, 4, generator=gen)
    full, _ = causal_conv1d(x, w)
    expected = F.silu(F.conv1d(F.pad(x.transpose(1, 2), (3, 0)), w.unsqueeze(1), groups=6)).transpose(1, 2)
    torch.testing.assert_close(full, expected)
    head, state = causal_conv1d(x[:, :13], w, output_final_state=True)
    tail = [causal_conv1d(x[:, t:t + 1], w, initial_state=state, output_final_state=True) for t in [13]]
    step, state = tail[0]
    rest, _ = causal_conv1d(x[:, 14:], w, initial_state=state)
    torch.testing.assert_close(torch.cat([head, step, rest], dim=1), full)
    cu = torch.tensor([0, 7, 20])
    packed, states = causal_conv1d(x, w, cu_seqlens=cu, output_final_state=True)
    second, second_state = causal_conv1d(x[:, 7:], w, output_final_state=True)
    torch.testing.assert_close(packed[:, 7:], second)
    torch.testing.assert_close(states[1:], second_state)


def test_head_counts_that_do_not_divide_are_rejected():
    q, k, v, g, beta, _ = make_inputs(8, H=6, HK=4, requires_grad=False)
    with pytest.raises(ValueError, match="not a multiple"):
        chunk_gated_delta_rule(q, k, v, g, beta)


def test_packed_conv_without_states_equals_each_document_alone():
    gen = torch.Generator().manual_seed(4)
    lengths = [1, 6, 2, 11]
    x = torch.randn(1, sum(lengths), 5, generator=gen)
    w = torch.randn(5, 4, generator=gen)
    cu = torch.tensor([0] + lengths).cumsum(0)
    packed, _ = causal_conv1d(x, w, cu_seqlens=cu)
    alone = torch.cat([causal_conv1d(x[:, s:e], w)[0] for s, e in zip(cu[:-1], cu[1:])], dim=1)
    torch.testing.assert_close(packed, alone)
