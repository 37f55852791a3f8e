"""The captured (CUDA graph) decode step against the eager one and the model's own forward, bf16."""

import pytest
import torch

from factory.models.hqwen3.decoding import Decoder, StaticCache
from factory.ops.gated_delta_rule.fla_backend import relative_rms_error
from tests.helpers import tiny_hybrid

pytestmark = pytest.mark.gpu
TOL = 0.02  # relative RMS error of logits; bf16 lands near 0.005


@pytest.mark.parametrize("batch", [1, 3])
def test_graph_decode_equals_eager_and_forward(batch):
    model = tiny_hybrid(seed=7, hidden_size=256, num_attention_heads=4, num_key_value_heads=2, head_dim=64,
                        intermediate_size=512).cuda().bfloat16()
    ids = torch.randint(1, 101, (batch, 80), device="cuda")
    prompt, steps = 64, 16
    logits = {}
    for graph in (False, True):
        decoder = Decoder(model, StaticCache(model, batch, 96), cuda_graph=graph)
        out = [decoder.prefill(ids[:, :prompt])]
        out += [decoder.step(ids[:, t:t + 1]) for t in range(prompt, prompt + steps)]
        logits[graph] = torch.stack(out, 1).float()
    with torch.no_grad():
        full = model(ids[:, :prompt + steps], use_cache=False).logits[:, prompt - 1:].float()
    assert relative_rms_error(logits[True], logits[False]) < TOL
    assert relative_rms_error(logits[False], full) < TOL
    assert relative_rms_error(logits[True], full) < TOL
