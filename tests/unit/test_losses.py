"""Tiled losses equal their full-logit definitions, in value and gradient."""

import pytest
import torch
import torch.nn.functional as F

from factory.distill.losses import tiled_cross_entropy, tiled_kl_loss


def full_kl(h_s, h_t, w_s, w_t, labels, temperature, ce_weight):
    valid = labels != -100
    s, t = (h_s[valid] @ w_s.t()), (h_t[valid] @ w_t.t())
    kl = F.kl_div(F.log_softmax(s / temperature, -1), F.log_softmax(t / temperature, -1), log_target=True,
                  reduction="sum") * temperature**2
    ce = F.cross_entropy(s, labels[valid], reduction="sum")
    return ((1 - ce_weight) * kl + ce_weight * ce if ce_weight else kl) / valid.sum()


@pytest.mark.parametrize("temperature, ce_weight, tile", [(1.0, 0.0, 3), (2.0, 0.3, 5), (1.0, 0.0, 1000)])
def test_tiled_kl_matches_full_logits(temperature, ce_weight, tile):
    gen = torch.Generator().manual_seed(0)
    h_s = torch.randn(2, 7, 8, generator=gen, dtype=torch.float64, requires_grad=True)
    w_s = torch.randn(11, 8, generator=gen, dtype=torch.float64, requires_grad=True)
    h_t = torch.randn(2, 7, 8, generator=gen, dtype=torch.float64)
    w_t = torch.randn(11, 8, generator=gen, dtype=torch.float64)
    labels = torch.randint(0, 11, (2, 7), generator=gen)
    labels[0, 3] = labels[1, 6] = -100
    got = tiled_kl_loss(h_s, h_t, w_s, w_t, labels, temperature, ce_weight, tile)
    want = full_kl(h_s, h_t, w_s, w_t, labels, temperature, ce_weight)
    torch.testing.assert_close(got.double(), want)
    g_got = torch.autograd.grad(got * 3, [h_s, w_s])
    g_want = torch.autograd.grad(want * 3, [h_s, w_s])
    for a, b in zip(g_got, g_want):
        torch.testing.assert_close(a, b)


def test_identical_distributions_have_zero_kl_and_hidden_gets_gradient():
    gen = torch.Generator().manual_seed(1)
    h = torch.randn(1, 9, 4, generator=gen, requires_grad=True)
    w = torch.randn(6, 4, generator=gen)
    labels = torch.randint(0, 6, (1, 9), generator=gen)
    loss = tiled_kl_loss(h, h.detach(), w, w, labels, tile_tokens=2)
    assert loss.abs() < 1e-6  # identical distributions
    loss.backward()
    assert h.grad is not None


def test_tiled_cross_entropy_matches_full_logits():
    gen = torch.Generator().manual_seed(2)
    h = torch.randn(2, 9, 4, generator=gen, dtype=torch.float64, requires_grad=True)
    w = torch.randn(6, 4, generator=gen, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, 6, (2, 9), generator=gen)
    labels[1, :4] = -100
    got = tiled_cross_entropy(h, w, labels, tile_tokens=4)
    want = F.cross_entropy((h @ w.t()).reshape(-1, 6), labels.reshape(-1), ignore_index=-100)
    torch.testing.assert_close(got.double(), want)
    for a, b in zip(torch.autograd.grad(got, [h, w]), torch.autograd.grad(want, [h, w])):
        torch.testing.assert_close(a, b)
