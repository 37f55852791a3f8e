"""Activation checkpointing (factory.layers.checkpoint, a reentrant checkpoint that ZeRO-3 supports)
gives what torch's own checkpoint gives: logits and every gradient, kept on the device or offloaded
to CPU memory, with frozen or trainable embeddings, with frozen layers below the first trainable one;
align's layerwise loss with only its GDN branches checkpointed; distill's shared teacher stream
(no grad) outside checkpointing."""

import contextlib
import copy
from types import SimpleNamespace

import pytest
import torch

from factory.layers import checkpoint as checkpoint_module
from factory.distributed.activation_checkpointing import enable_activation_checkpointing
from factory.config.schema import DistillConfig
from factory.stages.align import align_loss_fn
from factory.stages.distill import shared_loss_fn
from factory.train.trainable import select_trainable
from tests.helpers import tiny_hybrid


def _forward_backward(model, ids):
    model.zero_grad()
    logits = model(input_ids=ids, use_cache=False).logits
    logits.float().pow(2).mean().backward()
    return logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _count_recomputations(monkeypatch) -> list:
    calls = []
    original = checkpoint_module._Checkpoint.backward
    monkeypatch.setattr(checkpoint_module._Checkpoint, "backward",
                        staticmethod(lambda ctx, grad: calls.append(1) or original(ctx, grad)))
    return calls


@pytest.mark.parametrize("offload", [False, True])
@pytest.mark.parametrize("trainable", ["all", "gdn"])
def test_checkpointed_layers_equal_torch_checkpoint(offload, trainable, monkeypatch):
    reference = tiny_hybrid(seed=4).train()
    select_trainable(reference, trainable)  # "gdn": frozen embeddings and a frozen first layer
    reference.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    checkpointed = copy.deepcopy(reference)
    assert enable_activation_checkpointing(checkpointed, offload=offload) == reference.config.num_hidden_layers
    calls = _count_recomputations(monkeypatch)
    ids = torch.randint(0, reference.config.vocab_size, (2, 24))
    want_logits, want = _forward_backward(reference, ids)
    got_logits, got = _forward_backward(checkpointed, ids)
    assert len(calls) == reference.config.num_hidden_layers
    torch.testing.assert_close(got_logits, want_logits)
    assert got.keys() == want.keys() and any(".layers.1." in n for n in got)
    assert ("model.embed_tokens.weight" in got) is (trainable == "all")
    for name, grad in want.items():
        torch.testing.assert_close(got[name], grad, rtol=1e-5, atol=1e-7, msg=name)


def test_align_checkpoints_only_the_gdn_branches(monkeypatch):
    plain = tiny_hybrid(seed=5, keep_teacher_attention=True).train()
    checkpointed = copy.deepcopy(plain)
    enable_activation_checkpointing(checkpointed)
    calls = _count_recomputations(monkeypatch)
    ids = torch.randint(0, plain.config.vocab_size, (2, 24))
    batch = {"input_ids": ids, "position_ids": torch.arange(24).expand(2, -1)}
    grads = []
    for model in (plain, checkpointed):
        params = dict(select_trainable(model, "gdn"))
        loss, _ = align_loss_fn(model, "layerwise")(batch)
        loss.backward()
        grads.append({n: p.grad for n, p in params.items()})
    assert len(calls) == len(plain.config.linear_layers)  # one per GDN branch, no whole layer
    assert grads[1].keys() == grads[0].keys() and all(g is not None for g in grads[1].values())
    for name, grad in grads[0].items():
        torch.testing.assert_close(grads[1][name], grad, rtol=1e-5, atol=1e-7, msg=name)


def test_distill_shared_teacher_stream_is_not_checkpointed(monkeypatch):
    """The teacher stream runs under no_grad: checkpointed layers run it plainly (nothing kept, nothing
    recomputed), so the backward recomputes each layer once, for the student stream alone."""
    plain = tiny_hybrid(seed=6, keep_teacher_attention=True).train()
    checkpointed = copy.deepcopy(plain)
    enable_activation_checkpointing(checkpointed)
    calls = _count_recomputations(monkeypatch)
    checkpointed_calls = []
    original = checkpoint_module._Checkpoint.forward
    monkeypatch.setattr(checkpoint_module._Checkpoint, "forward",
                        staticmethod(lambda *args: checkpointed_calls.append(1) or original(*args)))
    ids = torch.randint(0, plain.config.vocab_size, (2, 24))
    batch = {"input_ids": ids, "position_ids": torch.arange(24).expand(2, -1), "labels": torch.roll(ids, -1, 1)}
    ctx = SimpleNamespace(gathered=lambda params: contextlib.nullcontext())
    results = []
    for model in (plain, checkpointed):
        params = dict(select_trainable(model, "gdn"))
        loss, _ = shared_loss_fn(ctx, DistillConfig(loss_tile_tokens=16), model)(batch)
        loss.backward()
        results.append((loss.detach(), {n: p.grad for n, p in params.items()}))
    assert len(calls) == len(checkpointed_calls) == plain.config.num_hidden_layers  # the student stream's
    assert results[0][0] > 0
    torch.testing.assert_close(results[1][0], results[0][0], rtol=1e-6, atol=0)
    for name, grad in results[0][1].items():
        torch.testing.assert_close(results[1][1][name], grad, rtol=1e-5, atol=1e-7, msg=name)
