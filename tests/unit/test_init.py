"""Attention -> GDN initialization on one process, and the incremental sharded safetensors writer
that the ZeRO-3 path uses (tests/distributed/test_sharded_init.py runs that path itself)."""

from __future__ import annotations

import json

import torch

from factory.config.schema import InitConfig
from factory.models.hqwen3.student import init_groups, saved_names
from factory.priming.init import build_hybrid_from_teacher


def tiny_teacher(tie: bool = False):
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(0)
    return Qwen3ForCausalLM(Qwen3Config(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                                        num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                                        tie_word_embeddings=tie)).eval()


def types(*gdn: int) -> list[str]:
    return ["linear_attention" if i in gdn else "full_attention" for i in range(4)]


def test_fresh_gdn_weights_depend_only_on_seed_and_layer():
    teacher = tiny_teacher()
    init = InitConfig(gate_init="random", conv_init="identity")
    one = build_hybrid_from_teacher(teacher, types(1, 3), init, seed=5)
    other = build_hybrid_from_teacher(teacher, types(3), init, seed=5)
    torch.manual_seed(123)  # the global RNG plays no part
    again = build_hybrid_from_teacher(teacher, types(1, 3), init, seed=5)
    reseeded = build_hybrid_from_teacher(teacher, types(1, 3), init, seed=6)
    gdn = {k: v for k, v in one.state_dict().items() if ".linear_attn." in k}
    for key, value in gdn.items():
        assert torch.equal(value, again.state_dict()[key]), key
    for key, value in other.state_dict().items():
        if key.startswith("model.layers.3.linear_attn."):
            assert torch.equal(value, gdn[key]), key  # layer 1's conversion drew nothing from layer 3's stream
    assert not torch.equal(gdn["model.layers.1.linear_attn.a_proj.weight"],
                           reseeded.state_dict()["model.layers.1.linear_attn.a_proj.weight"])
    assert not torch.equal(gdn["model.layers.1.linear_attn.a_proj.weight"],
                           gdn["model.layers.3.linear_attn.a_proj.weight"])


def test_everything_but_gdn_is_the_teachers():
    teacher = tiny_teacher(tie=True)
    hybrid = build_hybrid_from_teacher(teacher, types(0, 2), InitConfig(), seed=0)
    theirs = teacher.state_dict()
    for key, value in hybrid.state_dict().items():
        if ".linear_attn." not in key:
            assert torch.equal(value, theirs[key]), key
    assert hybrid.lm_head.weight is hybrid.model.embed_tokens.weight
    assert "lm_head" not in init_groups(hybrid.config) and "lm_head.weight" not in saved_names(hybrid)


def test_shard_writer_output_loads_like_save_pretrained(tmp_path):
    from factory.checkpoint.shards import ShardWriter, write_model_files
    from factory.models.hqwen3 import HQwen3ForCausalLM

    hybrid = build_hybrid_from_teacher(tiny_teacher(), types(1), InitConfig(), seed=0)
    writer = ShardWriter(tmp_path / "sharded", max_shard_bytes=20_000)
    for key, value in hybrid.state_dict().items():
        writer.add(key, value)
    files = writer.close()
    write_model_files(hybrid, tmp_path / "sharded", torch.float32)
    hybrid.save_pretrained(tmp_path / "whole")
    assert len(files) > 2 and files[0] == f"model-00001-of-{len(files):05d}.safetensors"
    index = json.loads((tmp_path / "sharded" / "model.safetensors.index.json").read_text())
    assert sorted(set(index["weight_map"].values())) == files
    assert not list((tmp_path / "sharded").glob("*.partial"))
    for name in ("config.json", "generation_config.json", "modeling_hqwen3.py", "configuration_hqwen3.py"):
        assert (tmp_path / "sharded" / name).read_text() == (tmp_path / "whole" / name).read_text(), name
    loaded = HQwen3ForCausalLM.from_pretrained(tmp_path / "sharded").state_dict()
    for key, value in hybrid.state_dict().items():
        assert torch.equal(loaded[key], value), key
