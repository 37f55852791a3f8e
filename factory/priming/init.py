"""Attention -> GDN initialization (DESIGN.md "Priming").

For each converted layer: q/k/v/o projections copied from the attention (GQA kept: K and V
keep the KV-head count and are repeated inside the layer), ``g_proj = 0.5 (W_O^T +
repeat(W_V))``, fresh A_log / dt_bias / a / b / convs, ``o_norm`` ones. Everything else is
copied unchanged. Works one layer at a time so sharded parameters can be gathered per layer.
"""

from __future__ import annotations

import torch

from factory.config.schema import InitConfig
from factory.layers.gdn import GatedDeltaNet


def gdn_config_kwargs(teacher_config, layer_types: list[str], init: InitConfig, keep_teacher_attention: bool) -> dict:
    """HQwen3Config fields for a hybrid of this teacher; GDN sizes follow the attention they replace."""
    data = teacher_config.to_dict()
    for key in ("model_type", "architectures", "auto_map", "transformers_version", "layer_types"):
        data.pop(key, None)
    return {**data, "layer_types": layer_types, "linear_allow_neg_eigval": init.allow_neg_eigval,
            "linear_qk_channel_scale": init.qk_norm == "scale", "keep_teacher_attention": keep_teacher_attention}


@torch.no_grad()
def init_gdn_from_attention(gdn: GatedDeltaNet, attn, init: InitConfig, generator: torch.Generator) -> None:
    H, dv = gdn.shape.num_query_heads, gdn.shape.value_head_dim
    gdn.q_proj.weight.copy_(attn.q_proj.weight)
    gdn.k_proj.weight.copy_(attn.k_proj.weight)
    gdn.v_proj.weight.copy_(attn.v_proj.weight)
    gdn.o_proj.weight.copy_(attn.o_proj.weight)
    if init.gate_init == "published":
        kv_heads = attn.v_proj.weight.shape[0] // dv
        w_v = attn.v_proj.weight.view(kv_heads, dv, -1).repeat_interleave(H // kv_heads, dim=0).reshape(H * dv, -1)
        gdn.g_proj.weight.copy_(0.5 * (attn.o_proj.weight.t() + w_v))
    else:
        torch.nn.init.normal_(gdn.g_proj.weight, std=0.02, generator=generator)
    for proj in (gdn.a_proj, gdn.b_proj):
        torch.nn.init.normal_(proj.weight, std=0.02, generator=generator)
    gdn.reset_gate_parameters(generator)
    gdn.o_norm.weight.fill_(1.0)
    for conv in (gdn.q_conv1d, gdn.k_conv1d, gdn.v_conv1d):
        if init.conv_init == "identity":
            # Pass-through at the current token, small noise elsewhere.
            torch.nn.init.normal_(conv.weight, std=0.01, generator=generator)
            conv.weight[:, 0, -1] = 1.0
        else:
            bound = 1.0 / conv.kernel_size[0] ** 0.5  # nn.Conv1d's default for a depthwise kernel
            conv.weight.uniform_(-bound, bound, generator=generator)
    if init.qk_norm == "scale":
        gdn.q_scale.copy_(attn.q_norm.weight)
        gdn.k_scale.copy_(attn.k_norm.weight)


def build_hybrid_from_teacher(teacher, layer_types: list[str], init: InitConfig, seed: int,
                              keep_teacher_attention: bool = True):
    """A new HQwen3ForCausalLM holding the teacher's weights, with GDN initialized in converted layers."""
    from factory.models.hqwen3 import HQwen3Config, HQwen3ForCausalLM

    config = HQwen3Config(**gdn_config_kwargs(teacher.config, layer_types, init, keep_teacher_attention))
    torch.manual_seed(seed)
    hybrid = HQwen3ForCausalLM(config).to(next(teacher.parameters()).dtype)
    missing, unexpected = hybrid.load_state_dict(teacher.state_dict(), strict=False)
    converted = set(config.linear_layers)
    dropped = [k for k in unexpected if not _is_converted_attention(k, converted)]
    if dropped or any(".linear_attn." not in k for k in missing):
        raise RuntimeError(f"teacher and hybrid parameters disagree: unexpected {dropped[:4]}, missing {missing[:4]}")
    generator = torch.Generator().manual_seed(seed)
    for i in sorted(converted):
        init_gdn_from_attention(hybrid.model.layers[i].linear_attn, teacher.model.layers[i].self_attn, init, generator)
    return hybrid


def _is_converted_attention(key: str, converted: set[int]) -> bool:
    parts = key.split(".")
    return len(parts) > 3 and parts[2].isdigit() and int(parts[2]) in converted and parts[3] == "self_attn"


def drop_teacher_attention(config, state: dict):
    """The student alone, from a hybrid's config and full state dict: converted layers lose
    their kept attention (after alignment)."""
    from factory.models.hqwen3 import HQwen3Config, HQwen3ForCausalLM

    data = config.to_dict()
    data.pop("auto_map", None)
    data.update(keep_teacher_attention=False)
    student = HQwen3ForCausalLM(HQwen3Config(**data))
    converted = set(config.linear_layers)
    student.load_state_dict({k: v for k, v in state.items() if not _is_converted_attention(k, converted)})
    return student.to(next(iter(state.values())).dtype)
