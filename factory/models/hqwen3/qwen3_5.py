"""HQwen3 written as a Qwen3.5 text model (``qwen3_5_text``, ``Qwen3_5ForCausalLM``), exactly.

Stock transformers (``models/qwen3_5``) and vLLM (``model_executor/models/qwen3_5.py``) load that
format with no code of ours. The conversions, derived from transformers 5.17's modeling file:

- Decoder, final and attention q/k norms compute ``x * (1 + w)``: stored as ``w - 1``. The GDN
  output norm (a gated RMSNorm) multiplies by ``w``: copied.
- Attention is Qwen3-Next's gated attention: ``q_proj`` holds ``[query, gate]`` per head and the
  output is multiplied by ``sigmoid(gate)``. Gate rows are zero (``sigmoid(0) = 0.5``, exact in
  any dtype) and ``o_proj`` is doubled. RoPE: Qwen3's parameters with ``partial_rotary_factor``
  1.0 (text positions make Qwen3.5's multimodal RoPE the plain one).
- GDN: Qwen3.5 repeats query and key heads up to the value-head count and keeps one state per
  value head. Ours keeps ``H`` query heads and one state per query head, so key and value heads
  are repeated to ``H`` (GQA order) in the weights: ``linear_num_key_heads = linear_num_value_heads
  = H``. A hybrid primed with ``init.kv_heads=expanded`` already has ``H`` key and value heads, each
  its own (trained apart): they are copied as they are, so that export is exact too. q/k/v become
  ``in_proj_qkv`` with one depthwise conv (``conv1d``); ``g_proj`` is ``in_proj_z``,
  ``a_proj``/``b_proj`` are ``in_proj_a``/``in_proj_b``, ``o_proj`` is ``out_proj``.

Pure functions over config dicts and tensors, one layer's GDN group buffered at a time, so an
export streams a 32B model without holding it.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import torch

ARCHITECTURE = "Qwen3_5ForCausalLM"
MODEL_TYPE = "qwen3_5_text"
SHIFTED_NORMS = ("input_layernorm.weight", "post_attention_layernorm.weight", "self_attn.q_norm.weight",
                 "self_attn.k_norm.weight")
GDN_PACKED = {"q_proj": ("in_proj_qkv", 0), "k_proj": ("in_proj_qkv", 1), "v_proj": ("in_proj_qkv", 2),
              "q_conv1d": ("conv1d", 0), "k_conv1d": ("conv1d", 1), "v_conv1d": ("conv1d", 2)}
GDN_RENAMED = {"g_proj": "in_proj_z", "a_proj": "in_proj_a", "b_proj": "in_proj_b", "o_proj": "out_proj",
               "o_norm": "norm", "A_log": "A_log", "dt_bias": "dt_bias"}
COPIED_CONFIG = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                 "num_key_value_heads", "head_dim", "hidden_act", "max_position_embeddings", "initializer_range",
                 "rms_norm_eps", "use_cache", "tie_word_embeddings", "attention_dropout", "pad_token_id",
                 "bos_token_id", "eos_token_id", "layer_types", "linear_conv_kernel_dim", "linear_key_head_dim",
                 "linear_value_head_dim")


def inexact_reason(config) -> str | None:
    """Why this HQwen3 config has no exact Qwen3.5 form, or None when it has one."""
    if config.linear_allow_neg_eigval:
        return "linear_allow_neg_eigval (beta in (0, 2)): Qwen3.5's GDN has beta = sigmoid(b) in (0, 1)"
    if config.linear_qk_channel_scale:
        return ("linear_qk_channel_scale (init.qk_norm=scale): Qwen3.5's GDN has no per-channel q/k scale "
                "between the conv and the L2 norm")
    if config.keep_teacher_attention:
        return "keep_teacher_attention: export the student alone"
    if config.hidden_act != "silu":
        return f"hidden_act={config.hidden_act!r}: Qwen3.5's GDN conv uses hidden_act, ours always silu"
    if config.attention_bias:
        return "attention_bias: vLLM's Qwen3.5 attention has no o_proj bias"
    if getattr(config, "use_sliding_window", False):
        return "use_sliding_window: Qwen3.5 has no sliding-window attention layers"
    return None


def qwen3_5_config(config) -> dict:
    """The ``Qwen3_5TextConfig`` fields of an HQwen3 config (a dict; the caller saves it)."""
    reason = inexact_reason(config)
    if reason:
        raise ValueError(f"no exact Qwen3.5 form: {reason}")
    fields = {name: getattr(config, name) for name in COPIED_CONFIG}
    heads = config.linear_num_query_heads
    rope = {**config.rope_parameters, "partial_rotary_factor": 1.0}
    return {**fields, "architectures": [ARCHITECTURE], "model_type": MODEL_TYPE, "attention_bias": False,
            "linear_num_key_heads": heads, "linear_num_value_heads": heads, "rope_parameters": rope,
            "partial_rotary_factor": 1.0}


def repeat_heads(weight: torch.Tensor, heads: int, to_heads: int) -> torch.Tensor:
    """Rows of ``heads`` equal blocks repeated to ``to_heads`` blocks, GQA order (block i is source
    block i // r), the order in which our kernel repeats key and value heads."""
    if to_heads == heads:
        return weight
    blocks = weight.reshape(heads, -1, *weight.shape[1:])
    return blocks.repeat_interleave(to_heads // heads, dim=0).reshape(-1, *weight.shape[1:])


def gated_query(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """``q_proj`` ``[heads * d, D]`` -> ``[heads * 2d, D]``: each head's query rows, then zero gate rows."""
    blocks = weight.reshape(heads, -1, weight.shape[-1])
    return torch.cat([blocks, torch.zeros_like(blocks)], dim=1).reshape(-1, weight.shape[-1])


def _gdn_part(config, module: str, tensor: torch.Tensor) -> torch.Tensor:
    """q/k/v projection or conv weight with its heads repeated to the query-head count."""
    heads = config.linear_num_query_heads
    have = {"q": heads, "k": config.linear_num_key_heads, "v": config.linear_num_value_heads}[module[0]]
    return repeat_heads(tensor, have, heads)


def convert_tensor(config, name: str, tensor: torch.Tensor) -> tuple[str, torch.Tensor] | None:
    """One HQwen3 tensor in Qwen3.5's name and layout (float32), or None for a GDN q/k/v part that
    :func:`convert_tensors` packs with its siblings."""
    parts = name.split(".")
    t = tensor.float()
    if name == "model.norm.weight" or name.endswith(SHIFTED_NORMS):
        return name, t - 1.0
    if len(parts) < 5 or parts[1] != "layers":
        return name, t
    kind, module = parts[3], parts[4]
    if kind == "self_attn" and module == "q_proj":
        return name, gated_query(t, config.num_attention_heads)
    if kind == "self_attn" and module == "o_proj":
        return name, t * 2.0
    if kind != "linear_attn":
        return name, t
    if module in GDN_PACKED:
        return None
    if module not in GDN_RENAMED:
        raise ValueError(f"{name}: no Qwen3.5 counterpart")
    return ".".join(parts[:4] + [GDN_RENAMED[module]] + parts[5:]), t


def convert_tensors(config, tensors: Iterable[tuple[str, torch.Tensor]]) -> Iterator[tuple[str, torch.Tensor]]:
    """HQwen3 ``(name, tensor)`` pairs in any order -> Qwen3.5's. A layer's q/k/v projections and convs
    are held until all three arrive, then written packed (q, k, v order)."""
    pending: dict[str, list] = {}
    for name, tensor in tensors:
        converted = convert_tensor(config, name, tensor)
        if converted is not None:
            yield converted
            continue
        parts = name.split(".")
        target, slot = GDN_PACKED[parts[4]]
        packed = ".".join(parts[:4] + [target] + parts[5:])
        group = pending.setdefault(packed, [None] * 3)
        group[slot] = _gdn_part(config, parts[4], tensor.float())
        if all(g is not None for g in group):
            yield packed, torch.cat(pending.pop(packed), dim=0)
    if pending:
        raise ValueError(f"incomplete GDN projections in the source: {sorted(pending)[:3]}")


def state_sizes(config, fmt: str) -> dict:
    """Per-sequence decoding state, in elements: recurrent state and conv window per GDN layer, KV cache
    per token per attention layer. The recurrent state is the same in both formats."""
    H, K, V = config.linear_num_query_heads, config.linear_num_key_heads, config.linear_num_value_heads
    dk, dv = config.linear_key_head_dim, config.linear_value_head_dim
    conv_channels = (H * dk + K * dk + V * dv) if fmt == "hqwen3" else (2 * H * dk + H * dv)
    return {"recurrent_state_per_gdn_layer": H * dk * dv,
            "conv_channels_per_gdn_layer": conv_channels,
            "kv_cache_per_token_per_attention_layer": 2 * config.num_key_value_heads * config.head_dim}


def parameter_counts(config) -> dict:
    """Parameters of the model in each format, from shapes alone (meta tensors: no memory)."""
    from factory.models.hqwen3.modeling_hqwen3 import HQwen3ForCausalLM

    with torch.device("meta"):
        model = HQwen3ForCausalLM(config)
    state = {k: v for k, v in model.state_dict().items()
             if not (config.tie_word_embeddings and k == "lm_head.weight")}
    return {"hqwen3": sum(t.numel() for t in state.values()),
            "qwen3_5": sum(t.numel() for _, t in convert_tensors(config, state.items()))}
