"""Attention -> GDN initialization (DESIGN.md "Priming").

For each converted layer: q/k/v/o projections copied from the attention (GQA kept: K and V
keep the KV-head count and are repeated inside the layer; with ``init.kv_heads=expanded`` they
get one head per query head instead, the teacher's rows repeated in the weights), ``g_proj =
0.5 (W_O^T + repeat(W_V))``, fresh A_log / dt_bias / a / b / convs, ``o_norm`` ones. Everything
else is copied unchanged. Works one layer at a time so sharded parameters can be gathered per layer.
"""

from __future__ import annotations

import hashlib

import torch

from factory.config.schema import InitConfig
from factory.layers.gdn import GatedDeltaNet
from factory.models.hqwen3 import HQwen3Config, HQwen3ForCausalLM
from factory.models.hqwen3.qwen3_5 import repeat_heads
from factory.models.hqwen3.student import init_groups, saved_names


def gdn_config_kwargs(teacher_config, layer_types: list[str], init: InitConfig, keep_teacher_attention: bool) -> dict:
    """HQwen3Config fields for a hybrid of this teacher; GDN sizes follow the attention they replace."""
    data = teacher_config.to_dict()
    for key in ("model_type", "architectures", "auto_map", "transformers_version", "layer_types"):
        data.pop(key, None)
    heads = {}
    if init.kv_heads == "expanded":  # one key and one value head per query head; the state is unchanged
        heads = {"linear_num_key_heads": data["num_attention_heads"],
                 "linear_num_value_heads": data["num_attention_heads"]}
    return {**data, **heads, "layer_types": layer_types, "linear_allow_neg_eigval": init.allow_neg_eigval,
            "linear_qk_channel_scale": init.qk_norm == "scale", "keep_teacher_attention": keep_teacher_attention}


def layer_generator(seed: int, index: int) -> torch.Generator:
    """The fresh GDN weights of layer ``index``: one stream per layer, so the values do not depend on
    which layers are converted, the order they are visited in, or which process initializes them."""
    digest = hashlib.sha256(f"gdn-init:{seed}:{index}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)


def _draw(param: torch.Tensor, fill, heads: int = 1, to_heads: int = 1) -> None:
    """Random values drawn on the CPU in fp32 whatever the parameter's device and dtype, so a gathered
    GPU parameter gets the same draws as a local CPU one (a CPU generator cannot fill a CUDA tensor).
    ``heads`` -> ``to_heads``: draw the rows of ``heads`` heads and repeat them (GQA order), so an
    expanded K/V conv gets the very draws of the shared one, repeated as the kernel would repeat them."""
    value = torch.empty((param.shape[0] * heads // to_heads, *param.shape[1:]), dtype=torch.float32)
    fill(value)
    param.copy_(repeat_heads(value, heads, to_heads))


@torch.no_grad()
def init_gdn_from_attention(gdn: GatedDeltaNet, attn, init: InitConfig, generator: torch.Generator) -> None:
    s = gdn.shape
    H, dv = s.num_query_heads, s.value_head_dim
    kv_heads = attn.v_proj.weight.shape[0] // dv  # the teacher's
    gdn.q_proj.weight.copy_(attn.q_proj.weight)
    gdn.k_proj.weight.copy_(repeat_heads(attn.k_proj.weight, kv_heads, s.num_key_heads))
    gdn.v_proj.weight.copy_(repeat_heads(attn.v_proj.weight, kv_heads, s.num_value_heads))
    gdn.o_proj.weight.copy_(attn.o_proj.weight)
    if init.gate_init == "published":
        gdn.g_proj.weight.copy_(0.5 * (attn.o_proj.weight.t() + repeat_heads(attn.v_proj.weight, kv_heads, H)))
    else:
        _draw(gdn.g_proj.weight, lambda t: t.normal_(0.0, 0.02, generator=generator))
    for proj in (gdn.a_proj, gdn.b_proj):
        _draw(proj.weight, lambda t: t.normal_(0.0, 0.02, generator=generator))
    gdn.reset_gate_parameters(generator)
    gdn.o_norm.weight.fill_(1.0)
    _init_convs(gdn, init, generator, kv_heads)
    if init.qk_norm == "scale":
        gdn.q_scale.copy_(attn.q_norm.weight)
        gdn.k_scale.copy_(attn.k_norm.weight)


def _init_convs(gdn: GatedDeltaNet, init: InitConfig, generator: torch.Generator, kv_heads: int) -> None:
    """The short convs, each drawn at the teacher's head count (so shared and expanded K/V draw alike)."""
    s = gdn.shape
    widths = ((s.num_query_heads, s.num_query_heads), (kv_heads, s.num_key_heads), (kv_heads, s.num_value_heads))
    for conv, (heads, to_heads) in zip((gdn.q_conv1d, gdn.k_conv1d, gdn.v_conv1d), widths):
        if init.conv_init == "identity":
            def identity(t):  # pass-through at the current token, small noise elsewhere
                t.normal_(0.0, 0.01, generator=generator)
                t[:, 0, -1] = 1.0
            _draw(conv.weight, identity, heads, to_heads)
        else:
            bound = 1.0 / conv.kernel_size[0] ** 0.5  # nn.Conv1d's default for a depthwise kernel
            _draw(conv.weight, lambda t: t.uniform_(-bound, bound, generator=generator), heads, to_heads)


def hybrid_config(teacher_config, layer_types: list[str], init: InitConfig, keep_teacher_attention: bool):
    return HQwen3Config(**gdn_config_kwargs(teacher_config, layer_types, init, keep_teacher_attention))


@torch.no_grad()
def init_group(name: str, hybrid_part: torch.nn.Module, teacher_part: torch.nn.Module, init: InitConfig,
               seed: int) -> list[str]:
    """Fill one hybrid submodule from the teacher's: tensors with the same name are copied, a GDN
    mixer is initialized from the attention it replaces. Returns the names written, with prefix."""
    ours, theirs = hybrid_part.state_dict(keep_vars=True), teacher_part.state_dict(keep_vars=True)
    gdn = getattr(hybrid_part, "linear_attn", None)
    fresh = {k for k in ours if k.startswith("linear_attn.")} if gdn is not None else set()
    dropped = {k for k in theirs if k not in ours and gdn is not None and k.startswith("self_attn.")}
    if set(ours) - fresh != set(theirs) - dropped:
        raise RuntimeError(f"teacher and hybrid parameters of {name} disagree: hybrid only "
                           f"{sorted(set(ours) - fresh - set(theirs))[:4]}, teacher only "
                           f"{sorted(set(theirs) - dropped - set(ours))[:4]}")
    for key in set(ours) - fresh:
        ours[key].copy_(theirs[key])
    if gdn is not None:
        init_gdn_from_attention(gdn, teacher_part.self_attn, init, layer_generator(seed, hybrid_part.layer_idx))
    return [f"{name}.{k}" for k in ours]


def build_hybrid_from_teacher(teacher, layer_types: list[str], init: InitConfig, seed: int,
                              keep_teacher_attention: bool = True):
    """A new HQwen3ForCausalLM holding the teacher's weights, with GDN initialized in converted layers."""
    config = hybrid_config(teacher.config, layer_types, init, keep_teacher_attention)
    torch.manual_seed(seed)  # construction's draws are all overwritten; kept for callers' global RNG state
    hybrid = HQwen3ForCausalLM(config).to(next(teacher.parameters()).dtype)
    written = []
    for name in init_groups(config):
        written += init_group(name, hybrid.get_submodule(name), teacher.get_submodule(name), init, seed)
    if set(written) != saved_names(hybrid) or len(written) != len(set(written)):
        raise RuntimeError(f"initialization missed {sorted(saved_names(hybrid) - set(written))[:4]}")
    return hybrid
