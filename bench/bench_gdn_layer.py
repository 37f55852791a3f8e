"""Forward+backward time of our GDN layer against a Qwen3 attention layer and the raw-kernel floor.

At Qwen3-32B layer shapes (hidden 5120, 64 query heads, 8 KV heads, head dim 128), batch 1, bf16:

  gdn        our ``GatedDeltaNet`` layer as shipped (fla kernels, fla's fused gated RMSNorm)
  gdn_torch_norm  the same layer with the pure-torch gated RMSNorm (``GatedRMSNorm.fused_on_cuda=False``)
  attn       transformers' ``Qwen3Attention`` (q/k/v/o projections, q/k RMSNorm, RoPE) on the faster
             of SDPA's cuDNN and flash backends (each tried with SDPA's native GQA, and with K/V
             repeated where native GQA is refused); the winner is recorded
  kernel     fla's raw ``chunk_gated_delta_rule`` on ready 64-head q/k/v (qk L2 norm in kernel)
  gemms      the seven projections our layer runs (q, k, v, a, b, g, o), nothing else
  floor      kernel + gemms; ``overhead`` = gdn / floor - 1 (goal <= 15%), also for gdn_torch_norm
  conv, norm components of the layer (three short convs; fused and torch gated RMSNorm)

Times are medians over CUDA-event-timed iterations after warmup; memory is freed between sizes.
The first size pays Triton's JIT compile and fla's autotuning of every kernel (minutes on an
H100); a progress line with wall-clock seconds follows each measurement.
Goals (issue 2): attn / gdn >= 2.2x at 32K and >= 7.5x at 128K; overhead <= 15%.

    python bench/bench_gdn_layer.py [--tokens 4096,16384,...] [--json results.json]
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from factory.layers.gdn import GatedDeltaNet, GatedRMSNorm, GDNShape  # noqa: E402
from timing import median_ms  # noqa: E402  (bench/ is the script's directory)

HIDDEN, HEADS, KV_HEADS, HEAD_DIM = 5120, 64, 8, 128
GOALS = {"attn_over_gdn_32k": 2.2, "attn_over_gdn_128k": 7.5, "overhead_max": 0.15}


# --------------------------------------------------------------------------- timing

def iterations(T: int, args) -> tuple[int, int]:
    """Fewer timed iterations at the longest sequences (attention alone takes ~2 s there)."""
    return (args.warmup, args.iters) if T <= 32768 else (1, max(3, args.iters // 2))


def free_memory():
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


_T0 = time.perf_counter()


def progress(T: int, name: str, value) -> None:
    shown = f"{value:.3f} ms" if isinstance(value, float) else value
    print(f"  [{time.perf_counter() - _T0:7.1f} s] T={T} {name}: {shown}", flush=True)


def fwd_bwd(module_fn, inputs, params, grad_out):
    """A step closure: clear grads, forward, backward with a fixed output gradient."""

    def step():
        for t in (*inputs, *params):
            t.grad = None
        out = module_fn(*inputs)
        out.backward(grad_out)

    return step


# --------------------------------------------------------------------------- modules

def gdn_layer(device, dtype, scale=1):
    shape = GDNShape(hidden_size=HIDDEN // scale, num_query_heads=HEADS // scale, num_key_heads=KV_HEADS // scale,
                     num_value_heads=KV_HEADS // scale, key_head_dim=HEAD_DIM, value_head_dim=HEAD_DIM)
    return GatedDeltaNet(shape, layer_idx=0).to(device=device, dtype=dtype)


def attention_layer(device, dtype, max_tokens, scale=1):
    from transformers import Qwen3Config
    from transformers.models.qwen3.modeling_qwen3 import Qwen3Attention, Qwen3RotaryEmbedding

    config = Qwen3Config(hidden_size=HIDDEN // scale, num_attention_heads=HEADS // scale,
                         num_key_value_heads=KV_HEADS // scale, head_dim=HEAD_DIM,
                         max_position_embeddings=max(max_tokens, 131072),
                         rope_parameters={"rope_type": "default", "rope_theta": 5_000_000.0},
                         attn_implementation="sdpa")
    attn = Qwen3Attention(config, layer_idx=0).to(device=device, dtype=dtype)
    rotary = Qwen3RotaryEmbedding(config).to(device)
    return attn, rotary


def _register_repeat_kv_sdpa() -> str:
    """An SDPA attention function that repeats K/V itself (for backends that refuse enable_gqa)."""
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import repeat_kv

    def sdpa_repeat_kv(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
        key, value = repeat_kv(key, module.num_key_value_groups), repeat_kv(value, module.num_key_value_groups)
        out = F.scaled_dot_product_attention(query, key, value, is_causal=True, scale=scaling)
        return out.transpose(1, 2).contiguous(), None

    AttentionInterface.register("bench_sdpa_repeat_kv", sdpa_repeat_kv)
    return "bench_sdpa_repeat_kv"


class Projections(nn.Module):
    """Exactly the GEMMs of our layer: q, k, v, a, b, g from the input, o from the mixed heads."""

    def __init__(self, layer: GatedDeltaNet):
        super().__init__()
        self.inputs = nn.ModuleList([layer.q_proj, layer.k_proj, layer.v_proj, layer.a_proj, layer.b_proj,
                                     layer.g_proj])
        self.o_proj = layer.o_proj

    def forward(self, x, mixed):
        return [proj(x) for proj in self.inputs] + [self.o_proj(mixed)]


# --------------------------------------------------------------------------- one size

def bench_size(T: int, args, device, dtype) -> dict:
    warmup, iters = iterations(T, args)
    row: dict = {"tokens": T, "warmup": warmup, "iters": iters}
    gen = torch.Generator(device=device).manual_seed(T)
    hidden = HIDDEN // args.scale
    x = torch.randn(1, T, hidden, device=device, generator=gen, dtype=dtype).requires_grad_()
    dy = torch.randn(1, T, hidden, device=device, generator=gen, dtype=dtype)

    # (a) our layer, as shipped (fla's fused gated norm) and with the pure-torch norm
    shipped = GatedRMSNorm.fused_on_cuda
    layer = gdn_layer(device, dtype, args.scale)
    params = list(layer.parameters())
    row["gdn_ms"] = median_ms(fwd_bwd(layer, [x], params, dy), warmup, iters)
    progress(T, "gdn", row["gdn_ms"])
    GatedRMSNorm.fused_on_cuda = False
    try:
        row["gdn_torch_norm_ms"] = median_ms(fwd_bwd(layer, [x], params, dy), warmup, iters)
    finally:
        GatedRMSNorm.fused_on_cuda = shipped
    progress(T, "gdn_torch_norm", row["gdn_torch_norm_ms"])
    free_memory()

    # components: the three short convs, the gated norm (fused and torch)
    B, H, D = 1, HEADS // args.scale, HEAD_DIM
    convs = (layer.q_conv1d, layer.k_conv1d, layer.v_conv1d)
    conv_in = [torch.randn(B, T, c.in_channels, device=device, generator=gen, dtype=dtype).requires_grad_()
               for c in convs]

    def conv_step():
        for t in conv_in:
            t.grad = None
        for c in convs:
            c.weight.grad = None
        outs = [c(t) for c, t in zip(convs, conv_in)]
        torch.autograd.backward(outs, [torch.ones_like(o) for o in outs])

    row["conv_ms"] = median_ms(conv_step, warmup, iters)
    progress(T, "conv", row["conv_ms"])
    del conv_in
    free_memory()
    o = torch.randn(B, T, H, D, device=device, generator=gen, dtype=dtype).requires_grad_()
    gate = torch.randn(B, T, H, D, device=device, generator=gen, dtype=dtype).requires_grad_()
    dnorm = torch.randn(B, T, H, D, device=device, generator=gen, dtype=dtype)
    for name, fused in (("norm_fused_ms", True), ("norm_torch_ms", False)):
        GatedRMSNorm.fused_on_cuda = fused
        try:
            row[name] = median_ms(fwd_bwd(layer.o_norm, [o, gate], [layer.o_norm.weight], dnorm), warmup, iters)
        finally:
            GatedRMSNorm.fused_on_cuda = shipped
        progress(T, name[:-3], row[name])
    del o, gate, dnorm
    free_memory()

    # (c) the floor: the seven GEMMs alone, and fla's raw kernel alone
    proj = Projections(layer)
    mixed = torch.randn(B, T, H * D, device=device, generator=gen, dtype=dtype).requires_grad_()
    with torch.no_grad():
        grads = [torch.randn_like(t) for t in proj(x, mixed)]

    def gemm_step():
        for t in (x, mixed, *params):
            t.grad = None
        torch.autograd.backward(proj(x, mixed), grads)

    row["gemms_ms"] = median_ms(gemm_step, warmup, iters)
    progress(T, "gemms", row["gemms_ms"])
    del proj, mixed, grads, layer, params
    free_memory()
    row["kernel_ms"] = time_kernel(T, args, device, dtype, gen, warmup, iters)
    progress(T, "kernel", row["kernel_ms"])
    row["floor_ms"] = row["gemms_ms"] + row["kernel_ms"]
    row["overhead"] = row["gdn_ms"] / row["floor_ms"] - 1
    row["overhead_torch_norm"] = row["gdn_torch_norm_ms"] / row["floor_ms"] - 1
    free_memory()

    # (b) attention
    row.update(time_attention(T, args, device, dtype, x, dy, warmup, iters))
    if row.get("attn_ms"):
        row["attn_over_gdn"] = row["attn_ms"] / row["gdn_ms"]
    del x, dy
    free_memory()
    if torch.cuda.is_available():
        row["peak_mem_gib"] = torch.cuda.max_memory_allocated() / 2**30
        torch.cuda.reset_peak_memory_stats()
    return row


def time_kernel(T, args, device, dtype, gen, warmup, iters) -> float:
    """fla's chunk_gated_delta_rule f+b on ready 64-head inputs, the dtypes our layer feeds it."""
    H, D = HEADS // args.scale, HEAD_DIM
    if device.type == "cuda":
        from fla.ops.gated_delta_rule import chunk_gated_delta_rule as kernel

        from factory.ops.gated_delta_rule.fla_backend import ensure_safe_backward

        ensure_safe_backward(device.index or 0)
    else:  # CPU smoke runs only
        from factory.ops.gated_delta_rule.naive import naive_chunk_gated_delta_rule as kernel
    q, k, v = (torch.randn(1, T, H, D, device=device, generator=gen, dtype=dtype).requires_grad_()
               for _ in range(3))
    g = (-F.softplus(torch.randn(1, T, H, device=device, generator=gen) - 4)).requires_grad_()
    beta = torch.rand(1, T, H, device=device, generator=gen).requires_grad_()
    do = torch.randn(1, T, H, D, device=device, generator=gen, dtype=dtype)

    def step():
        for t in (q, k, v, g, beta):
            t.grad = None
        o, _ = kernel(q, k, v, g, beta, use_qk_l2norm_in_kernel=True)
        o.backward(do)

    ms = median_ms(step, warmup, iters)
    del q, k, v, g, beta, do
    free_memory()
    return ms


def time_attention(T, args, device, dtype, x, dy, warmup, iters) -> dict:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    attn, rotary = attention_layer(device, dtype, T, args.scale)
    params = list(attn.parameters())
    with torch.no_grad():
        cos, sin = rotary(x, torch.arange(T, device=device).unsqueeze(0))
    repeat_impl = _register_repeat_kv_sdpa()
    backends = {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION,
                "efficient": SDPBackend.EFFICIENT_ATTENTION, "math": SDPBackend.MATH}
    result: dict = {"attn_tried": {}}
    for name in args.backends.split(","):
        for gqa, impl in (("enable_gqa", "sdpa"), ("repeat_kv", repeat_impl)):
            attn.config._attn_implementation = impl
            label = f"{name}/{gqa}"
            try:
                with sdpa_kernel([backends[name]]):
                    ms = median_ms(fwd_bwd(lambda h: attn(h, (cos, sin), None)[0], [x], params, dy), warmup, iters)
            except RuntimeError as err:  # backend refused these inputs
                result["attn_tried"][label] = f"failed: {str(err).splitlines()[0][:160]}"
                progress(T, f"attn {label}", result["attn_tried"][label])
                free_memory()
                continue
            result["attn_tried"][label] = ms
            progress(T, f"attn {label}", ms)
            free_memory()
            break  # native GQA worked: no need to time the repeated-K/V form on this backend
    timed = {k: v for k, v in result["attn_tried"].items() if isinstance(v, float)}
    if timed:
        best = min(timed, key=timed.get)
        result["attn_ms"], result["attn_backend"] = timed[best], best
    del attn, rotary, cos, sin, params
    return result


# --------------------------------------------------------------------------- main

def environment() -> dict:
    env = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
           "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None}
    for module in ("triton", "transformers", "fla"):
        try:
            env[module] = __import__(module).__version__
        except Exception as err:  # noqa: BLE001 - report, do not fail
            env[module] = f"unavailable ({type(err).__name__})"
    if torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name()
        env["capability"] = ".".join(map(str, torch.cuda.get_device_capability()))
    return env


def fmt(v, spec=".2f"):
    return "-" if v is None else format(v, spec)


def print_table(rows):
    head = (f"{'T':>7} | {'GDN ms':>8} | {'GDN torch norm':>14} | {'attn ms':>9} | {'attn backend':>18} | "
            f"{'attn/GDN':>8} | {'kernel':>8} | {'GEMMs':>8} | {'floor':>8} | {'overhead':>8} | "
            f"{'ovh torch':>9} | {'conv':>6} | {'norm fused/torch':>16}")
    print(head)
    print("-" * len(head))
    for r in rows:
        print(f"{r['tokens']:>7} | {fmt(r['gdn_ms']):>8} | {fmt(r['gdn_torch_norm_ms']):>14} | "
              f"{fmt(r.get('attn_ms')):>9} | {r.get('attn_backend', '-'):>18} | "
              f"{fmt(r.get('attn_over_gdn'), '.2f') + 'x':>8} | {fmt(r['kernel_ms']):>8} | {fmt(r['gemms_ms']):>8} | "
              f"{fmt(r['floor_ms']):>8} | {r['overhead'] * 100:>7.1f}% | {r['overhead_torch_norm'] * 100:>8.1f}% | "
              f"{fmt(r['conv_ms']):>6} | "
              f"{fmt(r['norm_fused_ms']) + '/' + fmt(r['norm_torch_ms']):>16}")


def goals(rows) -> dict:
    by_t = {r["tokens"]: r for r in rows}
    out = {}
    for key, T in (("attn_over_gdn_32k", 32768), ("attn_over_gdn_128k", 131072)):
        if T in by_t and by_t[T].get("attn_over_gdn"):
            got = by_t[T]["attn_over_gdn"]
            out[key] = {"goal": GOALS[key], "got": got, "met": got >= GOALS[key]}
    if rows:
        worst = max(r["overhead"] for r in rows)
        out["overhead_max"] = {"goal": GOALS["overhead_max"], "got": worst, "met": worst <= GOALS["overhead_max"],
                               "per_size": {r["tokens"]: r["overhead"] for r in rows}}
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", default="4096,16384,32768,65536,131072")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--backends", default="cudnn,flash", help="SDPA backends to try for attention")
    parser.add_argument("--scale", type=int, default=1, help="divide hidden size and head counts (smoke runs)")
    parser.add_argument("--json", type=Path, help="write environment, rows and goals here (after every size)")
    args = parser.parse_args(argv)
    if args.scale < 1 or KV_HEADS % args.scale:
        parser.error(f"--scale {args.scale} must divide the {KV_HEADS} key/value heads")
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    dtype = torch.bfloat16
    env = environment()
    print("environment:", json.dumps(env))
    print(f"shapes: hidden {HIDDEN // args.scale}, {HEADS // args.scale} query heads, {KV_HEADS // args.scale} KV "
          f"heads, head dim {HEAD_DIM}, batch 1, bf16; forward+backward ms, medians", flush=True)
    rows = []
    for T in (int(t) for t in args.tokens.split(",")):
        t0 = time.perf_counter()
        row = bench_size(T, args, device, dtype)
        row["wall_s"] = time.perf_counter() - t0
        rows.append(row)
        print(f"T={T}: " + json.dumps(row), flush=True)
        if args.json:
            args.json.write_text(json.dumps({"environment": env, "rows": rows, "goals": goals(rows)}, indent=1))
    print()
    print_table(rows)
    print()
    for key, g in goals(rows).items():
        print(f"goal {key}: goal {g['goal']}, got {g['got']:.3f} -> {'MET' if g['met'] else 'NOT MET'}")


if __name__ == "__main__":
    main()
