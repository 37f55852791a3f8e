"""Decoding paths: the SDPA backends a one-token query gets, and the static-cache decoder against
the model's own forward and ``generate()`` (CPU, fp32)."""

import pytest
import torch
import torch.nn.functional as F
from transformers import Qwen3Config, Qwen3ForCausalLM

from factory.models.hqwen3.decoding import Decoder, StaticCache
from tests.helpers import TINY, tiny_hybrid


def _sdpa_calls(monkeypatch):
    """Record, for every SDPA call, the query length and whether cuDNN attention was allowed."""
    calls = []
    original = F.scaled_dot_product_attention

    def spy(q, *args, **kwargs):
        calls.append((q.shape[-2], torch.backends.cuda.cudnn_sdp_enabled(), torch.backends.cuda.flash_sdp_enabled()))
        return original(q, *args, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    return calls


def test_one_token_decoding_never_reaches_cudnn_attention(monkeypatch):
    """cuDNN's SDPA plans anew for every key length (~10 ms CPU per call, issue 18): decode steps
    inside generate() must exclude it while prompts keep every backend."""
    model = tiny_hybrid(seed=3)
    calls = _sdpa_calls(monkeypatch)
    ids = torch.randint(1, 101, (2, 9))
    model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=4, do_sample=False, pad_token_id=0)
    prompt = [c for c in calls if c[0] > 1]
    decode = [c for c in calls if c[0] == 1]
    assert prompt and decode
    assert all(cudnn for _, cudnn, _ in prompt)
    assert all(not cudnn and flash for _, cudnn, flash in decode)
    assert torch.backends.cuda.cudnn_sdp_enabled()  # the restriction does not leak out of the call


@pytest.mark.parametrize("layer_types", [None, ["linear_attention", "full_attention"] * 2,
                                         ["linear_attention"] * 4])
def test_static_decoder_equals_full_forward(layer_types):
    model = tiny_hybrid(seed=4, layer_types=layer_types)
    ids = torch.randint(1, 101, (2, 11))
    decoder = Decoder(model, StaticCache(model, batch=2, max_len=16))
    with torch.no_grad():
        logits = [decoder.prefill(ids[:, :6])] + [decoder.step(ids[:, t:t + 1]) for t in range(6, 11)]
        full = model(ids, use_cache=False).logits
    torch.testing.assert_close(torch.stack(logits, 1), full[:, 5:], atol=1e-5, rtol=1e-4)


def test_static_decoder_greedy_equals_generate_for_hybrid_and_qwen3():
    torch.manual_seed(5)
    for model in (tiny_hybrid(seed=5), Qwen3ForCausalLM(Qwen3Config(**TINY)).eval()):
        ids = torch.randint(1, 101, (3, 7))
        want = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False,
                              pad_token_id=0)
        got = Decoder(model, StaticCache(model, batch=3, max_len=13)).generate(ids, max_new_tokens=6)
        assert torch.equal(got, want)


def test_static_cache_sizes_and_bounds():
    model = tiny_hybrid(seed=6)
    cache = StaticCache(model, batch=2, max_len=8)
    c = model.config
    kv = 2 * 2 * 8 * c.num_key_value_heads * c.head_dim * 4 * 2  # K+V, batch, len, heads, dim, fp32, 2 layers
    gdn = model.model.layers[1].linear_attn
    state = 2 * gdn.shape.num_query_heads * gdn.shape.key_head_dim * gdn.shape.value_head_dim * 4 * 2
    conv = 2 * sum(gdn.conv_channels) * gdn.shape.conv_size * 4 * 2
    assert cache.nbytes() == kv + state + conv
    decoder = Decoder(model, cache)
    with pytest.raises(ValueError, match="prefill first"):
        decoder.step(torch.ones(2, 1, dtype=torch.long))
    with pytest.raises(ValueError, match="does not fit"):
        decoder.prefill(torch.ones(2, 9, dtype=torch.long))
