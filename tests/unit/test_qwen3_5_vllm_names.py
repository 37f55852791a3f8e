"""The Qwen3.5 export against what vLLM's Qwen3.5 loader expects: names, packed shards, shapes, config.

vLLM is not installed here; the expectations are derived by reading vllm-project/vllm:
- vllm/model_executor/models/qwen3_5.py @ 00def4f8421153e037ff6270c0a8c31912a00206:
  ``Qwen3_5Model.load_weights`` (``stacked_params_mapping``, the non-LoRA branch),
  ``Qwen3_5ForCausalLMBase.packed_modules_mapping``, ``Qwen3_5DecoderLayer`` (GDN for
  ``linear_attention``, ``Qwen3NextAttention`` for ``full_attention``, GemmaRMSNorm (1 + w) norms,
  ``lm_head`` tied to ``embed_tokens`` when ``tie_word_embeddings``).
- vllm/model_executor/models/qwen3_next.py @ 002d6073aa034d4f5545d45021b0e56d1f3c3593:
  ``Qwen3NextAttention``: ``qkv_proj`` = QKVParallelLinear(hidden, head_dim,
  heads * (1 + attn_output_gate), kv_heads), ``attn_output_gate`` defaults to True, query and gate
  interleaved per head; ``q_norm``/``k_norm`` of ``head_dim``; ``o_proj`` without bias.
- vllm/model_executor/layers/mamba/gdn_linear_attn.py @ 0218d0504d613b57868a2686a88877614ba9a313:
  ``GatedDeltaNetAttention`` (``gqa_interleaved_layout=False`` for Qwen3.5): ``in_proj_qkvz`` output
  sizes ``[key_dim, key_dim, value_dim, value_dim]``, ``in_proj_ba`` ``[num_v_heads] * 2``,
  ``conv1d`` ``[2 key_dim + value_dim, 1, kernel]``, ``A_log``/``dt_bias`` ``[num_v_heads]``,
  ``norm`` RMSNormGated(head_v_dim), ``out_proj`` value_dim -> hidden.
"""

import json

import torch
from safetensors.torch import load_file

from factory.checkpoint.export import write_qwen3_5
from tests.helpers import tiny_hybrid

# (vLLM parameter, checkpoint name fragment, shard id), in the loader's order: the first match wins.
STACKED = [("qkv_proj", "q_proj", "q"), ("qkv_proj", "k_proj", "k"), ("qkv_proj", "v_proj", "v"),
           ("gate_up_proj", "gate_proj", 0), ("gate_up_proj", "up_proj", 1),
           ("in_proj_ba", "in_proj_b", 0), ("in_proj_ba", "in_proj_a", 1),
           ("in_proj_qkvz", "in_proj_qkv", (0, 1, 2)), ("in_proj_qkvz", "in_proj_z", 3)]
PACKED_MODULES = {"qkv_proj": ["q_proj", "k_proj", "v_proj"], "gate_up_proj": ["gate_proj", "up_proj"],
                  "in_proj_qkvz": ["in_proj_qkv", "in_proj_z"], "in_proj_ba": ["in_proj_b", "in_proj_a"]}
# Config fields the loader and its layers read.
CONFIG_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                 "num_key_value_heads", "head_dim", "hidden_act", "rms_norm_eps", "max_position_embeddings",
                 "rope_parameters", "tie_word_embeddings", "layer_types", "linear_num_key_heads",
                 "linear_num_value_heads", "linear_key_head_dim", "linear_value_head_dim", "linear_conv_kernel_dim")


def vllm_parameters(c: dict) -> dict:
    """vLLM's Qwen3_5ForCausalLM parameters at tensor-parallel size 1: name -> (shape, shard rows)."""
    D, hd, ffn = c["hidden_size"], c["head_dim"], c["intermediate_size"]
    q, kv = c["num_attention_heads"] * hd, c["num_key_value_heads"] * hd
    kd, vd = c["linear_num_key_heads"] * c["linear_key_head_dim"], c["linear_num_value_heads"] * c["linear_value_head_dim"]
    nv = c["linear_num_value_heads"]
    params = {"model.embed_tokens.weight": ((c["vocab_size"], D), None), "model.norm.weight": ((D,), None)}
    if not c["tie_word_embeddings"]:
        params["lm_head.weight"] = ((c["vocab_size"], D), None)
    for i, kind in enumerate(c["layer_types"]):
        p = f"model.layers.{i}."
        params.update({p + "input_layernorm.weight": ((D,), None), p + "post_attention_layernorm.weight": ((D,), None),
                       p + "mlp.gate_up_proj.weight": ((2 * ffn, D), {0: ffn, 1: ffn}),
                       p + "mlp.down_proj.weight": ((D, ffn), None)})
        if kind == "full_attention":  # attn_output_gate: query and gate rows per head
            params.update({p + "self_attn.qkv_proj.weight": ((2 * q + 2 * kv, D), {"q": 2 * q, "k": kv, "v": kv}),
                           p + "self_attn.o_proj.weight": ((D, q), None),
                           p + "self_attn.q_norm.weight": ((hd,), None), p + "self_attn.k_norm.weight": ((hd,), None)})
        else:
            params.update({
                p + "linear_attn.in_proj_qkvz.weight": ((2 * kd + 2 * vd, D), {(0, 1, 2): 2 * kd + vd, 3: vd}),
                p + "linear_attn.in_proj_ba.weight": ((2 * nv, D), {0: nv, 1: nv}),
                p + "linear_attn.conv1d.weight": ((2 * kd + vd, 1, c["linear_conv_kernel_dim"]), None),
                p + "linear_attn.A_log": ((nv,), None), p + "linear_attn.dt_bias": ((nv,), None),
                p + "linear_attn.norm.weight": ((c["linear_value_head_dim"],), None),
                p + "linear_attn.out_proj.weight": ((D, vd), None)})
    return params


def load_like_vllm(tensors: dict, params: dict) -> dict:
    """Each checkpoint tensor routed as the loader routes it; returns param -> {shard: rows}."""
    loaded: dict = {}
    for name, tensor in tensors.items():
        for param_name, weight_name, shard in STACKED:
            if weight_name in name:
                target = name.replace(weight_name, param_name)
                assert target in params, (name, target)
                shape, shards = params[target]
                assert shard in shards and tensor.shape == (shards[shard], *shape[1:]), (name, tensor.shape)
                loaded.setdefault(target, {})[shard] = tensor.shape[0]
                break
        else:
            assert name in params and tuple(tensor.shape) == params[name][0], (name, tensor.shape)
            loaded[name] = None
    return loaded


def test_export_matches_vllm_qwen3_5_loader(tmp_path):
    model = tiny_hybrid(num_attention_heads=8, num_key_value_heads=2, head_dim=8, num_hidden_layers=3,
                        layer_types=["linear_attention", "full_attention", "linear_attention"])
    model.save_pretrained(tmp_path / "source")
    write_qwen3_5(tmp_path / "source", tmp_path / "export", model.config, torch.bfloat16, lambda key: True)
    config = json.loads((tmp_path / "export" / "config.json").read_text())
    assert config["architectures"] == ["Qwen3_5ForCausalLM"] and config["model_type"] == "qwen3_5_text"
    assert all(field in config for field in CONFIG_FIELDS)
    assert config.get("attn_output_gate", True) is True  # transformers' Qwen3.5 always gates: vLLM must too
    assert config["rope_parameters"]["partial_rotary_factor"] == 1.0
    tensors = load_file(tmp_path / "export" / "model.safetensors")
    params = vllm_parameters(config)
    loaded = load_like_vllm(tensors, params)
    assert loaded.keys() == params.keys()  # every vLLM parameter loaded, nothing left over
    for name, (shape, shards) in params.items():
        if shards:
            assert loaded[name].keys() == shards.keys() and sum(loaded[name].values()) == shape[0], name
    for packed, parts in PACKED_MODULES.items():  # each packed module's parts are checkpoint names
        assert all(any(f".{part}." in name for name in tensors) for part in parts), packed
    # q_proj carries the zero gate half per head; o_proj is doubled.
    q = tensors["model.layers.1.self_attn.q_proj.weight"].float().reshape(8, 16, -1)
    assert torch.count_nonzero(q[:, 8:]) == 0 and torch.count_nonzero(q[:, :8]) > 0
