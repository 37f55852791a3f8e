"""Inference of the Qwen3.5-format export through stock transformers, against stock Qwen3 (issue 18).

``bench_inference.py`` compares the architectures through our static-cache decoder. This script
measures what a user of the export gets without our code: transformers' ``Qwen3_5ForCausalLM``
(the ``export.format=qwen3_5`` layout of the same 50% hybrid, GDN at odd layers) and transformers'
``Qwen3ForCausalLM``, both with random weights in bf16 on one device, through the library's own
cache objects and kernels (SDPA attention; on CUDA, fla's chunked and recurrent kernels, which
transformers picks for Qwen3.5 whenever fla imports). For each context:

  prefill_ms           one forward of ``context`` tokens with ``use_cache=True`` (median)
  decode_b1_ms         per-step time of one-token forwards against that cache at batch 1 (median of
                       ``--decode-steps`` steps, each bracketed by CUDA events, after 2 warm-up steps)
  cache_bytes          bytes of every tensor in the cache object after the prefill (KV, and for
                       Qwen3.5 the conv and recurrent states)

    python bench/bench_inference_export.py --shape 8b --contexts 4096,32768,131072 --json out.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from transformers import Qwen3_5ForCausalLM, Qwen3_5TextConfig, Qwen3Config, Qwen3ForCausalLM  # noqa: E402

from bench_inference import SHAPES, free_memory, meta, progress  # noqa: E402
from factory.models.hqwen3 import HQwen3Config  # noqa: E402
from factory.models.hqwen3.qwen3_5 import qwen3_5_config  # noqa: E402
from timing import elapsed_ms, median_ms  # noqa: E402

MODELS = ("qwen3_5", "qwen3")


def build(kind: str, shape: dict, device, dtype):
    common = dict(**shape, max_position_embeddings=262144, rope_theta=5_000_000.0, tie_word_embeddings=False)
    if kind == "qwen3_5":
        n = shape["num_hidden_layers"]
        types = ["linear_attention" if i % 2 else "full_attention" for i in range(n)]
        config = Qwen3_5TextConfig(**qwen3_5_config(HQwen3Config(**common, layer_types=types)))
        cls = Qwen3_5ForCausalLM
    else:
        cls, config = Qwen3ForCausalLM, Qwen3Config(**common)
    with torch.device(device):
        model = cls._from_config(config, dtype=dtype, attn_implementation="sdpa")
    return model.eval()


def tensor_bytes(obj, seen=None) -> int:
    """Bytes of every tensor reachable from a cache object (its layers, lists and dicts)."""
    seen = set() if seen is None else seen
    if id(obj) in seen:
        return 0
    seen.add(id(obj))
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(tensor_bytes(v, seen) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(tensor_bytes(v, seen) for v in obj)
    if hasattr(obj, "__dict__"):
        return sum(tensor_bytes(v, seen) for v in vars(obj).values())
    return 0


def measure(model, context: int, args, device, cuda: bool) -> dict:
    ids = torch.randint(1, model.config.vocab_size, (1, context), device=device)
    prefill_ms = median_ms(lambda: model(ids, use_cache=True), 1, 1 if context > 32768 else args.iters, cuda)
    out = model(ids, use_cache=True)
    cache, tok = out.past_key_values, out.logits[:, -1:].argmax(-1)
    del out
    cache_bytes = tensor_bytes(cache)
    times = []
    for i in range(args.decode_steps + 2):
        def step():
            nonlocal tok
            tok = model(tok, past_key_values=cache, use_cache=True).logits[:, -1:].argmax(-1)
        ms = elapsed_ms(step, cuda)
        if i >= 2:
            times.append(ms)
    step_ms = statistics.median(times)
    return {"prefill_ms": prefill_ms, "decode_b1_ms": step_ms, "decode_b1_tok_s": 1e3 / step_ms,
            "cache_bytes": cache_bytes, "cache_gib": cache_bytes / 2**30}


def ratios(rows: list[dict]) -> dict:
    by = {(r["model"], r["context"]): r for r in rows}
    out = {}
    for (model, L), h in by.items():
        t = by.get(("qwen3", L))
        if model == "qwen3_5" and t is not None:
            out[str(L)] = {"prefill_speedup": t["prefill_ms"] / h["prefill_ms"],
                           "decode_b1": h["decode_b1_tok_s"] / t["decode_b1_tok_s"],
                           "cache_memory": h["cache_bytes"] / t["cache_bytes"]}
    return out


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", choices=sorted(SHAPES), default="8b")
    p.add_argument("--layers", type=int, default=0, help="decoder layers (0: the shape's own depth)")
    p.add_argument("--contexts", default="4096,32768,131072")
    p.add_argument("--models", default=",".join(MODELS))
    p.add_argument("--decode-steps", type=int, default=16)
    p.add_argument("--iters", type=int, default=3)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    contexts = [int(c) for c in args.contexts.split(",")]
    models = args.models.split(",")
    if unknown := sorted(set(models) - set(MODELS)):
        p.error(f"unknown model(s) {unknown}; accepted: {', '.join(MODELS)}")
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    dtype = torch.bfloat16 if cuda else torch.float32
    shape = dict(SHAPES[args.shape], num_hidden_layers=args.layers or SHAPES[args.shape]["num_hidden_layers"])
    results = {"meta": meta(args, device), "rows": []}
    for kind in models:  # one model on the device at a time
        torch.manual_seed(0)
        model = build(kind, shape, device, dtype)
        with torch.no_grad():
            for L in contexts:
                row = {"model": kind, "context": L, **measure(model, L, args, device, cuda)}
                results["rows"].append(row)
                results["ratios"] = ratios(results["rows"])
                progress(f"{kind} {L:>6}: prefill {row['prefill_ms']:.1f} ms, decode b1 {row['decode_b1_ms']:.2f} ms/step, "
                         f"cache {row['cache_gib']:.3f} GiB")
                if args.json:
                    args.json.parent.mkdir(parents=True, exist_ok=True)
                    args.json.write_text(json.dumps(results, indent=1))
        del model
        free_memory()
    for L, r in results.get("ratios", {}).items():
        progress(f"qwen3_5/qwen3 at {L}: " + ", ".join(f"{k} {v:.2f}x" for k, v in r.items()))
    return results


if __name__ == "__main__":
    main()
