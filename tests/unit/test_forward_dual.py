"""``HQwen3Model.forward_dual`` (distill's per-layer teacher stream) against the two passes it replaces:
the same teacher and student hidden states and the same GDN gradients, on packed rows, with activation
checkpointing recomputing the student stream alone; and the distill loss per_layer == whole."""

import contextlib
import copy
from types import SimpleNamespace

import pytest
import torch

from factory.config.schema import DistillConfig
from factory.distributed.activation_checkpointing import enable_activation_checkpointing
from factory.layers import checkpoint as checkpoint_module
from factory.stages.distill import shared_loss_fn
from factory.stages.training import teacher_stream_hidden
from factory.train.trainable import select_trainable
from tests.helpers import tiny_hybrid

T = 24


def packed_batch(model, seed=0) -> dict:
    """Two rows, each holding documents that restart their positions (packed rows)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, model.config.vocab_size, (2, T), generator=g)
    positions = torch.cat([torch.arange(10), torch.arange(T - 10)]).expand(2, -1).clone()
    positions[1] = torch.cat([torch.arange(5), torch.arange(T - 5)])
    return {"input_ids": ids, "position_ids": positions, "labels": torch.roll(ids, -1, 1), "use_cache": False}


def two_passes(model, batch):
    target = teacher_stream_hidden(model, batch)
    inputs = {k: batch[k] for k in ("input_ids", "position_ids")}
    return target, model.model(**inputs, use_cache=False).last_hidden_state


def dual(model, batch):
    return model.model.forward_dual(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False)


def student_grads(model, forward, batch):
    params = dict(select_trainable(model, "gdn"))
    model.zero_grad()
    target, hidden = forward(model, batch)
    (hidden - target).pow(2).mean().backward()
    return target.detach(), hidden.detach(), {n: p.grad.clone() for n, p in params.items()}


def test_packed_rows_are_packed(monkeypatch):
    """The batch really takes the packed path (GDN gets cu_seqlens), so the equality below covers it."""
    model = tiny_hybrid(seed=1, keep_teacher_attention=True).train()
    seen = []
    layer = model.model.layers[model.config.linear_layers[0]]
    original = layer._gdn
    monkeypatch.setattr(layer, "_gdn", lambda x, masks, cu, cache: seen.append(cu) or original(x, masks, cu, cache))
    dual(model, packed_batch(model))
    assert seen and seen[0] is not None and seen[0].tolist() == [0, 10, T, T + 5, 2 * T]


@pytest.mark.parametrize("checkpointing", [False, True])
def test_dual_equals_two_passes(checkpointing, monkeypatch):
    base = tiny_hybrid(seed=2, keep_teacher_attention=True).train()
    batch = packed_batch(base)
    want_target, want_hidden, want = student_grads(copy.deepcopy(base), two_passes, batch)
    model = copy.deepcopy(base)
    if checkpointing:
        enable_activation_checkpointing(model)
    forwards, recomputations = [], []
    original_forward, original_backward = checkpoint_module._Checkpoint.forward, checkpoint_module._Checkpoint.backward
    monkeypatch.setattr(checkpoint_module._Checkpoint, "forward",
                        staticmethod(lambda *args: forwards.append(1) or original_forward(*args)))
    monkeypatch.setattr(checkpoint_module._Checkpoint, "backward",
                        staticmethod(lambda ctx, grad: recomputations.append(1) or original_backward(ctx, grad)))
    target, hidden, got = student_grads(model, dual, batch)
    layers = base.config.num_hidden_layers
    # Checkpointing wraps the student stream of each layer, never the teacher's.
    assert len(forwards) == len(recomputations) == (layers if checkpointing else 0)
    torch.testing.assert_close(target, want_target, rtol=0, atol=0)
    torch.testing.assert_close(hidden, want_hidden, rtol=1e-6, atol=1e-7)
    assert got.keys() == want.keys() and len(got) > 0
    for name, grad in want.items():
        torch.testing.assert_close(got[name], grad, rtol=1e-5, atol=1e-7, msg=name)


@pytest.mark.parametrize("layer_types", [["full_attention", "full_attention", "linear_attention", "full_attention"],
                                         ["linear_attention", "full_attention", "linear_attention", "full_attention"]])
def test_layers_below_the_first_converted_one_run_once(layer_types):
    """Both streams are the same computation until the first converted layer, so those layers run once;
    from there each layer runs both. The results still equal the two passes'."""
    base = tiny_hybrid(seed=4, keep_teacher_attention=True, layer_types=layer_types).train()
    batch = packed_batch(base)
    want_target, want_hidden, want = student_grads(copy.deepcopy(base), two_passes, batch)
    model = copy.deepcopy(base)
    calls = {i: 0 for i in range(len(layer_types))}
    for i, layer in enumerate(model.model.layers):
        layer.mlp.register_forward_hook(lambda module, args, out, i=i: calls.__setitem__(i, calls[i] + 1))
    target, hidden, got = student_grads(model, dual, batch)
    first = layer_types.index("linear_attention")
    assert calls == {i: 1 if i < first else 2 for i in calls}
    torch.testing.assert_close(target, want_target, rtol=0, atol=0)
    torch.testing.assert_close(hidden, want_hidden, rtol=1e-6, atol=1e-7)
    for name, grad in want.items():
        torch.testing.assert_close(got[name], grad, rtol=1e-5, atol=1e-7, msg=name)


def test_teacher_stream_keeps_no_autograd_state():
    model = tiny_hybrid(seed=3, keep_teacher_attention=True).train()
    select_trainable(model, "gdn")
    target, hidden = dual(model, packed_batch(model))
    assert target.grad_fn is None and not target.requires_grad
    assert hidden.requires_grad


def test_dual_needs_the_kept_teacher_attention():
    model = tiny_hybrid(seed=3)
    with pytest.raises(ValueError, match="keep_teacher_attention"):
        dual(model, packed_batch(model))


def test_distill_loss_per_layer_equals_whole():
    base = tiny_hybrid(seed=7, keep_teacher_attention=True).train()
    batch = packed_batch(base, seed=1)
    ctx = SimpleNamespace(gathered=lambda params: contextlib.nullcontext())
    results = {}
    for stream in ("whole", "per_layer"):
        model = copy.deepcopy(base)
        params = dict(select_trainable(model, "gdn"))
        loss, _ = shared_loss_fn(ctx, DistillConfig(loss_tile_tokens=16, teacher_stream=stream), model)(batch)
        loss.backward()
        results[stream] = (loss.detach(), {n: p.grad for n, p in params.items()})
    assert results["whole"][0] > 0
    torch.testing.assert_close(results["per_layer"][0], results["whole"][0], rtol=1e-6, atol=0)
    for name, grad in results["whole"][1].items():
        torch.testing.assert_close(results["per_layer"][1][name], grad, rtol=1e-5, atol=1e-7, msg=name)
