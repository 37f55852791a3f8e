"""One forward KL serves distillation, selection scoring and evaluation; kl_trained trains through
the stages' loop and engine."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from factory.config.schema import DataConfig, InitConfig, SelectConfig
from factory.distill.losses import forward_kl, tiled_kl_loss
from factory.priming import scoring
from factory.priming.select import select_layers
from tests.fixtures import make_tiny_assets


def test_forward_kl_from_logits_and_log_probs():
    torch.manual_seed(0)
    s, t = torch.randn(5, 11), torch.randn(5, 11)
    p_t = F.softmax(t, -1)
    want = (p_t * (p_t.log() - F.log_softmax(s, -1))).sum()
    assert torch.allclose(forward_kl(s, t), want, atol=1e-6)
    assert torch.allclose(forward_kl(F.log_softmax(s, -1), F.log_softmax(t, -1), log_probs=True), want, atol=1e-6)
    assert torch.allclose(forward_kl(s, t, temperature=2.0), forward_kl(s / 2, t / 2), atol=1e-6)


def test_tiled_kl_is_the_mean_forward_kl():
    torch.manual_seed(0)
    h_s, h_t, w_s, w_t = torch.randn(2, 6, 4), torch.randn(2, 6, 4), torch.randn(9, 4), torch.randn(9, 4)
    labels = torch.randint(0, 9, (2, 6))
    want = forward_kl(h_s.reshape(-1, 4) @ w_s.t(), h_t.reshape(-1, 4) @ w_t.t()) / 12
    assert torch.allclose(tiled_kl_loss(h_s, h_t, w_s, w_t, labels, tile_tokens=5), want, atol=1e-6)


def test_kl_trained_uses_the_training_loop_and_engine(tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    assets = make_tiny_assets(tmp_path, num_layers=2)
    teacher = AutoModelForCausalLM.from_pretrained(assets["teacher"], dtype=torch.float32).eval().requires_grad_(False)
    data = DataConfig(train_files=[str(assets["train"])], heldout_files=[str(assets["heldout"])], seq_len=64)
    inputs = scoring.ScoringInputs(teacher, AutoTokenizer.from_pretrained(assets["teacher"]), data, InitConfig(), seed=0)
    calls = []
    real_loop = scoring.train_loop

    def counted(engine, loader, loss_fn, steps, *args, **kwargs):
        calls.append((type(engine).__name__, steps))
        return real_loop(engine, loader, loss_fn, steps, *args, **kwargs)

    monkeypatch.setattr(scoring, "train_loop", counted)
    cfg = SelectConfig(method="kl_trained", ratio=0.5, window=8, calibration_rows=2, calibration_samples=2,
                       trained_steps=2, trained_batch_size=2)
    select_layers(cfg, 2, inputs)
    assert calls == [("LocalEngine", 2)] * 2
