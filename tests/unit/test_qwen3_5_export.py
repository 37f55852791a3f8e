"""The Qwen3.5-format export: stock transformers, with no code of ours, computes what HQwen3 computes.

The stock side runs in a fresh interpreter in which ``import factory`` fails (asserted) and fla is
blocked (``tests.helpers.STOCK_ONLY``): transformers' Qwen3.5 picks fla's kernels whenever fla
imports, even for CPU tensors, where they cannot run, so with fla blocked its own pure-torch GDN
path runs. These tests are never skipped.
"""

import json
from pathlib import Path

import pytest
import torch

from factory.checkpoint.export import write_qwen3_5
from factory.config import compose
from factory.config.validate import ConfigError, validate_static
from factory.models.hqwen3 import qwen3_5
from tests.helpers import hybrid_config, run_stock_python, tiny_hybrid

ROOT = Path(__file__).resolve().parents[2]
NEW_TOKENS = 12

STOCK_CHECK = """
import json, torch
from transformers import AutoModelForCausalLM
saved = torch.load("reference.pt")
model = AutoModelForCausalLM.from_pretrained("export").eval()
assert type(model).__name__ == "Qwen3_5ForCausalLM", type(model).__name__
assert sys.modules.get("fla") is None  # the pure-torch GDN path ran
with torch.no_grad():
    logits = model(saved["ids"]).logits
    generated = model.generate(saved["ids"], max_new_tokens=saved["new"], min_new_tokens=saved["new"],
                               do_sample=False, pad_token_id=0)
print(json.dumps({"max_abs_diff": (logits - saved["logits"]).abs().max().item(),
                  "generated": generated.tolist(), "model_type": model.config.model_type}))
"""


def randomize(model) -> None:
    """Norm weights away from 1 (so the stored ``w - 1`` matters) and GDN gates away from defaults."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.normal_(1.0, 0.2)
            elif name.endswith(("A_log", "dt_bias")):
                param.normal_(0.0, 0.5)


def gqa4_hybrid():
    """Query heads 4x the K/V heads, GDN layers not in an alternating pattern."""
    model = tiny_hybrid(seed=1, num_attention_heads=8, num_key_value_heads=2, head_dim=8, num_hidden_layers=5,
                        layer_types=["linear_attention", "linear_attention", "full_attention", "linear_attention",
                                     "full_attention"])
    randomize(model)
    return model


def gqa4_expanded_hybrid():
    """The same shape primed with ``init.kv_heads=expanded`` and trained: one K/V head per query head,
    the heads of a teacher group no longer equal."""
    model = tiny_hybrid(seed=2, num_attention_heads=8, num_key_value_heads=2, head_dim=8, num_hidden_layers=5,
                        linear_num_key_heads=8, linear_num_value_heads=8,
                        layer_types=["linear_attention", "linear_attention", "full_attention", "linear_attention",
                                     "full_attention"])
    randomize(model)
    return model


def teacher_hybrid():
    """The embedded teacher with half its layers made GDN by the priming initialization."""
    from transformers import AutoModelForCausalLM

    from factory.config.schema import InitConfig
    from factory.priming.init import build_hybrid_from_teacher

    teacher = AutoModelForCausalLM.from_pretrained(ROOT / "assets" / "teacher", dtype=torch.float32)
    layers = ["full_attention", "linear_attention"] * (teacher.config.num_hidden_layers // 2)
    return build_hybrid_from_teacher(teacher, layers, InitConfig(), seed=0, keep_teacher_attention=False).eval()


def export(model, root: Path) -> Path:
    model.save_pretrained(root / "source")
    write_qwen3_5(root / "source", root / "export", model.config, torch.float32, lambda key: True)
    return root / "export"


@pytest.mark.parametrize("build", [gqa4_hybrid, gqa4_expanded_hybrid, teacher_hybrid],
                         ids=["gqa4_random", "gqa4_expanded_kv", "embedded_teacher"])
def test_stock_transformers_matches_hqwen3_logits_and_cached_greedy_generation(build, tmp_path):
    model = build()
    export(model, tmp_path)
    ids = torch.randint(1, model.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = model(ids).logits
        generated = model.generate(ids, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False,
                                   pad_token_id=0)
    torch.save({"ids": ids, "logits": logits, "new": NEW_TOKENS}, tmp_path / "reference.pt")
    result = run_stock_python(STOCK_CHECK, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    got = json.loads(result.stdout.strip().splitlines()[-1])
    assert got["model_type"] == "qwen3_5_text"
    assert got["max_abs_diff"] <= 1e-4, got["max_abs_diff"]
    assert got["generated"] == generated.tolist()


def test_export_config_is_stock_qwen3_5_text(tmp_path):
    model = gqa4_hybrid()
    config = json.loads((export(model, tmp_path) / "config.json").read_text())
    assert config["architectures"] == ["Qwen3_5ForCausalLM"] and config["model_type"] == "qwen3_5_text"
    assert config["rope_parameters"]["partial_rotary_factor"] == 1.0 == config["partial_rotary_factor"]
    assert config["rope_parameters"]["rope_theta"] == model.config.rope_parameters["rope_theta"]
    assert config["linear_num_key_heads"] == config["linear_num_value_heads"] == 8
    assert config["layer_types"] == model.config.layer_types and "auto_map" not in config
    assert not list(tmp_path.joinpath("export").glob("*.py"))


@pytest.mark.parametrize("option,words", [({"linear_allow_neg_eigval": True}, "beta"),
                                          ({"linear_qk_channel_scale": True}, "per-channel")])
def test_inexact_options_are_refused_in_one_line(option, words):
    config = hybrid_config(**option)
    with pytest.raises(ValueError, match=words) as error:
        qwen3_5.qwen3_5_config(config)
    assert "\n" not in str(error.value)


def test_config_validation_refuses_options_the_format_cannot_hold():
    cfg, _ = compose(["+recipe=gdn_50pct", "init.qk_norm=scale"])
    with pytest.raises(ConfigError, match="export.format=qwen3_5 cannot hold init.qk_norm=scale"):
        validate_static(cfg)
    cfg, _ = compose(["+recipe=gdn_50pct", "init.allow_neg_eigval=true"])
    with pytest.raises(ConfigError, match="allow_neg_eigval"):
        validate_static(cfg)
    cfg, _ = compose(["+recipe=gdn_50pct", "init.qk_norm=scale", "export.format=hqwen3"])
    validate_static(cfg)
    cfg, _ = compose(["+recipe=gdn_50pct", "export.format=onnx"])
    with pytest.raises(ConfigError, match="export.format"):
        validate_static(cfg)


def test_qwen3_32b_sizes_in_the_readme_are_the_functions():
    """README's format-cost table is what parameter_counts/state_sizes give at the Qwen3-32B shape."""
    from factory.models.hqwen3 import HQwen3Config

    n = 64
    config = HQwen3Config(vocab_size=151936, hidden_size=5120, intermediate_size=25600, num_hidden_layers=n,
                          num_attention_heads=64, num_key_value_heads=8, head_dim=128,
                          layer_types=["full_attention", "linear_attention"] * (n // 2))
    counts = qwen3_5.parameter_counts(config)
    readme = (ROOT / "README.md").read_text()
    for fmt in ("hqwen3", "qwen3_5"):
        assert f"{counts[fmt]:,}" in readme, fmt
        sizes = qwen3_5.state_sizes(config, fmt)
        assert f"{sizes['conv_channels_per_gdn_layer']:,}" in readme
    assert f"{qwen3_5.state_sizes(config, 'qwen3_5')['recurrent_state_per_gdn_layer']:,}" in readme
