"""Sequence-tiled MLPs (longctx.tiled_mlp_tokens) compute what whole-row MLPs do: logits, the
input gradient and every parameter gradient, with tiles that do not divide the row."""

import copy

import pytest
import torch

from factory.distributed.tiled_mlp import apply_tiled_mlp
from tests.helpers import tiny_hybrid


def _loss_and_grads(model, ids):
    model.zero_grad()
    logits = model(input_ids=ids, use_cache=False).logits
    logits.float().pow(2).mean().backward()
    return logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_tiled_mlp_equals_whole_row_mlp(monkeypatch):
    torch.manual_seed(0)
    whole = tiny_hybrid(seed=3).train()
    tiled = copy.deepcopy(whole)
    ids = torch.randint(0, whole.config.vocab_size, (2, 40))
    want_logits, want = _loss_and_grads(whole, ids)

    mlp_class, tokens_seen = type(whole.model.layers[0].mlp), []
    plain = mlp_class.forward
    monkeypatch.setattr(mlp_class, "forward", lambda self, x: tokens_seen.append(x.shape[-2]) or plain(self, x))
    assert apply_tiled_mlp(tiled, tile_tokens=7) == whole.config.num_hidden_layers
    got_logits, got = _loss_and_grads(tiled, ids)
    # 6 tiles a row forward, 6 of the flattened 80 tokens in the backward, per layer
    assert len(tokens_seen) == 12 * whole.config.num_hidden_layers and max(tokens_seen) <= 14
    torch.testing.assert_close(got_logits, want_logits, rtol=1e-5, atol=1e-6)
    assert got.keys() == want.keys() and any(".mlp." in n for n in got)
    for name, grad in want.items():
        torch.testing.assert_close(got[name], grad, rtol=1e-4, atol=1e-6, msg=name)


def test_tile_size_must_be_positive():
    with pytest.raises(ValueError, match="positive"):
        apply_tiled_mlp(tiny_hybrid(), tile_tokens=0)


def test_parallelize_applies_tiled_mlps_then_checkpointing():
    from factory.distributed.parallelize import parallelize

    model = tiny_hybrid()
    done = parallelize(model, tiled_mlp_tokens=7, activation_checkpointing=True)
    layers = model.config.num_hidden_layers
    assert (done.sp_degree, done.tiled_mlp_layers, done.checkpointed_layers) == (1, layers, layers)
    assert all(layer.gradient_checkpointing and "tiled" in layer.mlp.forward.__func__.__name__
               for layer in model.model.layers)
