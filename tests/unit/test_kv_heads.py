"""``init.kv_heads=expanded``: GDN keys and values get one trainable head per query head, initialized by
repeating the teacher's K/V rows, so the model at step 0 is the shared one; it saves, loads, decodes and
sizes like any HQwen3 (the Qwen3.5 export: tests/unit/test_qwen3_5_export.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from factory.config.schema import InitConfig
from factory.models.hqwen3 import HQwen3Config, HQwen3ForCausalLM
from factory.models.hqwen3 import qwen3_5
from factory.models.hqwen3.decoding import Decoder, StaticCache
from factory.priming.init import build_hybrid_from_teacher
from tests.helpers import tiny_hybrid

ROOT = Path(__file__).resolve().parents[2]
TYPES = ["full_attention", "linear_attention", "linear_attention", "full_attention"]


def tiny_teacher():
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(0)
    return Qwen3ForCausalLM(Qwen3Config(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                                        num_attention_heads=4, num_key_value_heads=2, head_dim=8)).eval()


def primed(teacher, kv_heads: str, **init):
    return build_hybrid_from_teacher(teacher, TYPES, InitConfig(kv_heads=kv_heads, **init), seed=3,
                                     keep_teacher_attention=False).eval()


@pytest.mark.parametrize("init", [{}, {"gate_init": "random", "conv_init": "identity", "qk_norm": "scale"}],
                         ids=["published", "random_gate-identity_conv-qk_scale"])
def test_expanded_is_the_shared_model_at_initialization(init):
    teacher = tiny_teacher()
    shared, expanded = primed(teacher, "shared", **init), primed(teacher, "expanded", **init)
    assert shared.config.linear_num_key_heads == shared.config.linear_num_value_heads == 2
    assert expanded.config.linear_num_key_heads == expanded.config.linear_num_value_heads == 4
    gdn = expanded.model.layers[1].linear_attn
    assert gdn.k_proj.out_features == gdn.v_proj.out_features == gdn.k_conv1d.in_channels == 4 * 8
    teacher_k = teacher.model.layers[1].self_attn.k_proj.weight.view(2, 8, -1)
    assert torch.equal(gdn.k_proj.weight.view(4, 8, -1), teacher_k.repeat_interleave(2, dim=0))  # GQA order
    ids = torch.randint(0, 97, (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        # Equal up to fp32 rounding (~1e-7 seen): a wider GEMM may sum in another order.
        torch.testing.assert_close(expanded(ids).logits, shared(ids).logits, atol=1e-6, rtol=0)


def test_expanded_heads_are_trainable_and_train_apart():
    model = primed(tiny_teacher(), "expanded").train()
    ids = torch.randint(0, 97, (2, 40), generator=torch.Generator().manual_seed(2))
    model(ids, labels=ids).loss.backward()
    gdn = model.model.layers[1].linear_attn
    for proj in (gdn.k_proj, gdn.v_proj):
        assert proj.weight.requires_grad
        grad = proj.weight.grad.view(4, 8, -1)
        # Heads 0 and 1 start as the same teacher head; each query head's state pulls its own way.
        assert grad[0].abs().sum() > 0 and not torch.allclose(grad[0], grad[1])


def test_save_load_round_trip_and_configs_without_head_counts_load_shared(tmp_path):
    expanded = tiny_hybrid(seed=2, linear_num_key_heads=4, linear_num_value_heads=4)
    expanded.save_pretrained(tmp_path / "expanded")
    loaded = HQwen3ForCausalLM.from_pretrained(tmp_path / "expanded").eval()
    assert loaded.config.linear_num_key_heads == loaded.config.linear_num_value_heads == 4
    assert all(torch.equal(v, loaded.state_dict()[k]) for k, v in expanded.state_dict().items())
    shared = tiny_hybrid(seed=2)
    shared.save_pretrained(tmp_path / "old")
    path = tmp_path / "old" / "config.json"
    config = json.loads(path.read_text())
    for key in ("linear_num_query_heads", "linear_num_key_heads", "linear_num_value_heads"):
        del config[key]  # a config that never named them
    path.write_text(json.dumps(config))
    old = HQwen3ForCausalLM.from_pretrained(tmp_path / "old").eval()
    assert old.config.linear_num_key_heads == old.config.num_key_value_heads == 2
    ids = torch.randint(1, 101, (1, 12))
    with torch.no_grad():
        assert torch.equal(old(ids).logits, shared(ids).logits)


def test_static_and_cached_decoding_of_an_expanded_hybrid():
    model = tiny_hybrid(seed=4, linear_num_key_heads=4, linear_num_value_heads=4)  # distinct heads, as trained
    ids = torch.randint(1, 101, (2, 11), generator=torch.Generator().manual_seed(4))
    decoder = Decoder(model, StaticCache(model, batch=2, max_len=16))
    with torch.no_grad():
        logits = [decoder.prefill(ids[:, :6])] + [decoder.step(ids[:, t:t + 1]) for t in range(6, 11)]
        full = model(ids, use_cache=False).logits
    torch.testing.assert_close(torch.stack(logits, 1), full[:, 5:], atol=1e-5, rtol=1e-4)
    want = model.generate(ids[:, :6], attention_mask=torch.ones_like(ids[:, :6]), max_new_tokens=5, do_sample=False,
                          pad_token_id=0)
    assert torch.equal(Decoder(model, StaticCache(model, batch=2, max_len=11)).generate(ids[:, :6], 5), want)


def qwen3_32b(kv_heads: int) -> HQwen3Config:
    n = 64
    return HQwen3Config(vocab_size=151936, hidden_size=5120, intermediate_size=25600, num_hidden_layers=n,
                        num_attention_heads=64, num_key_value_heads=8, head_dim=128,
                        linear_num_key_heads=kv_heads, linear_num_value_heads=kv_heads,
                        layer_types=["full_attention", "linear_attention"] * (n // 2))


def test_qwen3_32b_costs_of_expanded_in_the_readme_are_the_functions():
    shared, expanded = qwen3_32b(8), qwen3_32b(64)
    counts, shared_counts = qwen3_5.parameter_counts(expanded), qwen3_5.parameter_counts(shared)
    assert counts["qwen3_5"] == shared_counts["qwen3_5"]  # the export repeats shared heads to this width anyway
    sizes, shared_sizes = qwen3_5.state_sizes(expanded, "hqwen3"), qwen3_5.state_sizes(shared, "hqwen3")
    assert sizes["recurrent_state_per_gdn_layer"] == shared_sizes["recurrent_state_per_gdn_layer"]
    readme = (ROOT / "README.md").read_text()
    extra = counts["hqwen3"] - shared_counts["hqwen3"]
    for figure in (counts["hqwen3"], extra, extra // 32, sizes["conv_channels_per_gdn_layer"],
                   sizes["recurrent_state_per_gdn_layer"]):
        assert f"{figure:,}" in readme, figure
