"""Checkpoints kept in CPU memory (longctx.offload_checkpoints) give what ordinary activation
checkpointing gives: logits and every gradient, with frozen embeddings (the layer input needs no
gradient, the layers' parameters still do) and with everything trainable."""

import copy

import pytest
import torch

from factory.train import checkpoint_offload
from factory.train.checkpoint_offload import offload_checkpoints
from tests.helpers import tiny_hybrid


def _forward_backward(model, ids):
    model.zero_grad()
    logits = model(input_ids=ids, use_cache=False).logits
    logits.float().pow(2).mean().backward()
    return logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("frozen_embeddings", [True, False])
def test_offloaded_checkpoints_equal_ordinary_checkpoints(frozen_embeddings, monkeypatch):
    reference = tiny_hybrid(seed=4).train()
    reference.model.embed_tokens.weight.requires_grad_(not frozen_embeddings)
    reference.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    offloaded = copy.deepcopy(reference)
    assert offload_checkpoints(offloaded) == reference.config.num_hidden_layers
    calls = []
    original = checkpoint_offload._OffloadedCheckpoint.backward
    monkeypatch.setattr(checkpoint_offload._OffloadedCheckpoint, "backward",
                        staticmethod(lambda ctx, grad: calls.append(1) or original(ctx, grad)))
    ids = torch.randint(0, reference.config.vocab_size, (2, 24))
    want_logits, want = _forward_backward(reference, ids)
    got_logits, got = _forward_backward(offloaded, ids)
    assert len(calls) == reference.config.num_hidden_layers
    torch.testing.assert_close(got_logits, want_logits)
    assert got.keys() == want.keys() and any(".layers.0." in n for n in got)
    assert ("model.embed_tokens.weight" in got) is not frozen_embeddings
    for name, grad in want.items():
        torch.testing.assert_close(got[name], grad, rtol=1e-5, atol=1e-7, msg=name)


def test_offloading_needs_checkpointing_enabled():
    with pytest.raises(ValueError, match="activation checkpointing"):
        offload_checkpoints(tiny_hybrid())
