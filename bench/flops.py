"""FLOPs per token of the benchmarks' models, counted from their layers (matmuls of the linear
weights, attention's and GDN's cores), for MFU: see bench_zero3_throughput.py's docstring."""

from __future__ import annotations

import torch

GDN_CHUNK = 64  # fla's chunk size, used by the kernel FLOP count


def numel(p: torch.nn.Parameter) -> int:
    return getattr(p, "ds_numel", p.numel())  # whole size, also of a ZeRO-3 shard


def linear_params(module, skip: tuple[str, ...] = ()) -> int:
    """nn.Linear weights under ``module``, leaving out submodules named in ``skip``."""
    return sum(numel(m.weight) for name, m in module.named_modules()
               if isinstance(m, torch.nn.Linear) and not set(name.split(".")) & set(skip))


def trainable_linear_params(model) -> int:
    return sum(numel(m.weight) for m in model.modules() if isinstance(m, torch.nn.Linear) and m.weight.requires_grad)


def attn_core(cfg, T: int) -> float:
    return 2.0 * cfg.num_attention_heads * cfg.head_dim * T


def gdn_core(cfg) -> float:
    dk, dv = cfg.linear_key_head_dim, cfg.linear_value_head_dim
    return cfg.linear_num_query_heads * (6.0 * dk * dv + GDN_CHUNK * (6.0 * dk + 4.0 * dv))


def layer_cost(layer, cfg, T: int, path: str) -> tuple[int, float]:
    """(linear params, core forward FLOPs) of a decoder layer on ``path``: ``student`` runs its own
    mixer, ``teacher`` its attention (kept attention in converted layers)."""
    if getattr(layer, "is_linear", False) and path == "student":
        return linear_params(layer, skip=("self_attn",)), gdn_core(cfg)
    return linear_params(layer, skip=("linear_attn",)), attn_core(cfg, T)


def stack_flops(model, T: int, path: str, from_first_linear: bool = False) -> tuple[float, float]:
    """Forward FLOPs of the decoder stack (``from_first_linear``: only from the first converted
    layer up), and its input-gradient FLOPs from the first layer holding a trainable parameter up."""
    layers = model.model.layers
    costs = [layer_cost(layer, model.config, T, path) for layer in layers]
    trains = [any(p.requires_grad for p in layer.parameters()) for layer in layers]
    first = trains.index(True) if True in trains else len(costs)
    linear = [getattr(layer, "is_linear", False) for layer in layers]
    start = linear.index(True) if from_first_linear and True in linear else 0
    forward = sum(2 * p + c for p, c in costs[start:])
    return forward, sum(2 * p + 2 * c for p, c in costs[first:])


def align_flops(model, T: int, loss: str) -> dict:
    if loss == "pre_lm_head":
        teacher, _ = stack_flops(model, T, "teacher")
        student, input_grads = stack_flops(model, T, "student")
        return {"forward": teacher + student, "backward": input_grads + 2 * trainable_linear_params(model)}
    cfg, layers = model.config, model.model.layers
    forward = 2 * linear_params(model.model) + len(layers) * attn_core(cfg, T)
    forward += sum(gdn_core(cfg) for layer in layers if layer.is_linear)
    backward = 2 * trainable_linear_params(model) + sum(
        2 * numel(layer.linear_attn.o_proj.weight) + 2 * gdn_core(cfg) for layer in layers if layer.is_linear)
    return {"forward": forward, "backward": backward}


def lm_flops(model, T: int) -> dict:
    """A causal LM trained end to end: stack, head, input gradients and trainable weight gradients."""
    forward, input_grads = stack_flops(model, T, "student")
    head = 2 * numel(model.lm_head.weight)
    return {"forward": forward + head, "backward": input_grads + head + 2 * trainable_linear_params(model)}
