"""HQwen3 model invariances: Qwen3 parity, packing, cached decoding, save/load, gradients, config errors."""

import os
import subprocess
import sys
import textwrap

import pytest
import torch
from transformers import Qwen3Config, Qwen3ForCausalLM

from factory.models.hqwen3 import HQwen3Config, HQwen3ForCausalLM
from factory.models.hqwen3.remote_code import write_remote_code
from tests.helpers import TINY, tiny_hybrid


@pytest.fixture(scope="module")
def qwen3_checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("qwen3")
    Qwen3ForCausalLM(Qwen3Config(**TINY)).save_pretrained(path)
    return path


def test_all_attention_hqwen3_equals_qwen3(qwen3_checkpoint):
    qwen3 = Qwen3ForCausalLM.from_pretrained(qwen3_checkpoint).eval()
    hqwen3 = HQwen3ForCausalLM.from_pretrained(qwen3_checkpoint).eval()
    assert hqwen3.config.layer_types == ["full_attention"] * TINY["num_hidden_layers"]
    assert set(hqwen3.state_dict()) == set(qwen3.state_dict())
    ids = torch.randint(0, TINY["vocab_size"], (2, 17))
    mask = torch.ones_like(ids)
    mask[1, :5] = 0
    with torch.no_grad():
        for kwargs in ({}, {"attention_mask": mask}):
            diff = (hqwen3(ids, **kwargs).logits - qwen3(ids, **kwargs).logits).abs()
            if kwargs:
                diff = diff[mask.bool()]
            assert diff.max() <= 1e-5


@pytest.mark.parametrize("layer_types", [
    ["linear_attention"] * 4, ["full_attention"] * 4, None])
def test_packed_rows_equal_documents_alone(layer_types):
    model = tiny_hybrid(layer_types=layer_types)
    lengths = [7, 20, 1, 12]
    docs = [torch.randint(0, 101, (1, n)) for n in lengths]
    packed = torch.cat(docs, dim=1)
    position_ids = torch.cat([torch.arange(n) for n in lengths]).unsqueeze(0)
    with torch.no_grad():
        logits = model(packed, position_ids=position_ids, use_cache=False).logits
        alone = torch.cat([model(d, use_cache=False).logits for d in docs], dim=1)
    torch.testing.assert_close(logits, alone, atol=1e-5, rtol=1e-4)


def test_cached_greedy_generation_equals_full_forward_argmax():
    model = tiny_hybrid(seed=1)
    ids = torch.randint(1, 101, (2, 9))
    ids[0, :3] = 0
    mask = torch.ones_like(ids)
    mask[0, :3] = 0  # left padding
    out = model.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=0)
    seq, seq_mask = ids, mask
    with torch.no_grad():
        for _ in range(8):
            position_ids = (seq_mask.cumsum(-1) - 1).clamp_min(0)
            logits = model(seq, attention_mask=seq_mask, position_ids=position_ids, use_cache=False).logits
            nxt = logits[:, -1].argmax(-1, keepdim=True)
            seq = torch.cat([seq, nxt], dim=1)
            seq_mask = torch.cat([seq_mask, torch.ones_like(nxt)], dim=1)
    assert torch.equal(out, seq)


def test_save_load_with_trust_remote_code_in_fresh_process(tmp_path):
    model = tiny_hybrid(seed=2)
    model.save_pretrained(tmp_path)
    write_remote_code(tmp_path)
    assert model.config.to_dict()["auto_map"]["AutoModelForCausalLM"].endswith("HQwen3ForCausalLM")
    ids = torch.arange(1, 30).unsqueeze(0)
    with torch.no_grad():
        torch.save(model(ids).logits, tmp_path / "expected.pt")
    script = textwrap.dedent(f"""
        import torch
        from transformers import AutoModelForCausalLM
        model = AutoModelForCausalLM.from_pretrained({str(tmp_path)!r}, trust_remote_code=True).eval()
        with torch.no_grad():
            logits = model(torch.arange(1, 30).unsqueeze(0)).logits
        assert torch.equal(logits, torch.load({str(tmp_path / 'expected.pt')!r})), "logits differ"
        assert type(model).__name__ == "HQwen3ForCausalLM"
    """)
    # -I: no site-packages path hacks, and cwd elsewhere, so `factory` is only importable if installed;
    # the checkpoint must not need it.
    env = {**os.environ, "PYTHONPATH": ""}
    subprocess.run([sys.executable, "-c", "import sys; sys.modules['factory'] = None\n" + script],
                   check=True, cwd=tmp_path, env=env)


def test_every_gdn_parameter_gets_a_finite_nonzero_gradient():
    model = tiny_hybrid(seed=3).train()
    ids = torch.randint(0, 101, (2, 40))
    model(ids, labels=ids).loss.backward()
    for name, p in model.named_parameters():
        if ".linear_attn." in name:
            assert p.grad is not None, name
            assert torch.isfinite(p.grad).all(), name
            assert p.grad.abs().sum() > 0, name


@pytest.mark.parametrize("overrides, field", [
    ({"linear_num_value_heads": 3}, "linear_num_value_heads"),
    ({"linear_num_key_heads": 3}, "linear_num_key_heads"),
    ({"layer_types": ["full_attention", "mamba2", "full_attention", "linear_attention"]}, "layer_types"),
    ({"layer_types": ["full_attention"] * 3}, "layer_types"),
])
def test_bad_configs_fail_at_construction_naming_the_field(overrides, field):
    layer_types = overrides.pop("layer_types", None)
    kwargs = {**TINY, **overrides}
    if layer_types is not None:
        kwargs["layer_types"] = layer_types
    with pytest.raises(ValueError) as err:
        HQwen3Config(**kwargs)
    message = str(err.value)
    assert field in message and "\n" not in message


def test_query_heads_differ_from_key_value_heads():
    # Qwen3-32B proportions: 8x more query heads than key/value heads.
    model = tiny_hybrid(num_attention_heads=8, num_key_value_heads=1, head_dim=8)
    gdn = model.model.layers[1].linear_attn
    assert gdn.q_proj.out_features == 8 * 8 and gdn.k_proj.out_features == 8 and gdn.v_proj.out_features == 8
    with torch.no_grad():
        assert torch.isfinite(model(torch.randint(0, 101, (1, 30))).logits).all()


def test_align_mode_runs_teacher_stream_and_records_pairs():
    model = tiny_hybrid(keep_teacher_attention=True)
    ids = torch.randint(0, 101, (1, 20))
    model.model.set_mixer_mode("teacher")
    with torch.no_grad():
        teacher = model(ids).logits
    model.model.set_mixer_mode("align")
    aligned = model(ids, use_cache=False).logits
    torch.testing.assert_close(aligned, teacher)
    pairs = [layer.alignment_pair for layer in model.model.layers if layer.is_linear]
    assert all(p is not None and p[0].requires_grad and not p[1].requires_grad for p in pairs)
    with pytest.raises(ValueError, match="mixer mode"):
        model.model.set_mixer_mode("both")


def test_align_step_loss_releases_the_layers_pairs():
    from factory.stages.align import align_loss_fn

    model = tiny_hybrid(keep_teacher_attention=True)
    ids = torch.randint(0, 101, (2, 20))
    batch = {"input_ids": ids, "position_ids": torch.arange(20).expand(2, -1)}
    loss, _ = align_loss_fn(model, "layerwise")(batch)
    loss.backward()
    assert loss.item() > 0
    assert all(layer.alignment_pair is None for layer in model.model.layers)
