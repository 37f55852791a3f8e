"""The Hopper-guard self-check (fla_backend.ensure_safe_backward) runs lazily in the first training
forward, which can be inside activation checkpointing. Here fla is replaced by the reference so the
check runs on the CPU; the test fails if the check's saved tensors leak into the checkpoint."""

import types

import torch
from torch.utils.checkpoint import checkpoint

from factory.ops.gated_delta_rule import fla_backend
from factory.ops.gated_delta_rule.naive import naive_chunk_gated_delta_rule


def _reference_as_fla(monkeypatch):
    guard = types.SimpleNamespace(IS_NVIDIA_HOPPER=True, TRITON_ABOVE_3_4_0=True, TRITON_ABOVE_3_7_1=False)
    gdr = types.SimpleNamespace(chunk_gated_delta_rule=naive_chunk_gated_delta_rule)
    monkeypatch.setattr(fla_backend, "_fla", lambda: (gdr, None, guard))
    monkeypatch.setattr(fla_backend, "_device", lambda index: torch.device("cpu"))
    fla_backend.ensure_safe_backward.cache_clear()
    return guard


def _inputs(T=32, H=2, D=16):
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, T, H, D, generator=gen, requires_grad=True) for _ in range(3))
    g = torch.nn.functional.logsigmoid(torch.randn(1, T, H, generator=gen)).requires_grad_()
    beta = torch.rand(1, T, H, generator=gen).requires_grad_()
    return q, k, v, g, beta


def _chunk(q, k, v, g, beta):
    o, _ = fla_backend.fla_chunk(q, k, v, g, beta, None, None, False, True, None, 64)
    return o


def test_first_call_inside_checkpoint_matches_plain_backward(monkeypatch):
    guard = _reference_as_fla(monkeypatch)
    try:
        inputs = _inputs()
        checkpoint(_chunk, *inputs, use_reentrant=False).square().sum().backward()
        assert guard.TRITON_ABOVE_3_7_1, "the self-check did not run or did not pass"
        got = [t.grad.clone() for t in inputs]
        plain = _inputs()
        _chunk(*plain).square().sum().backward()
        for a, b in zip(got, plain):
            torch.testing.assert_close(a, b.grad)
    finally:
        fla_backend.ensure_safe_backward.cache_clear()
