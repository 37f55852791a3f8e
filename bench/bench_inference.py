"""Inference cost of the hybrid against the all-attention model of the same shape (issue 18).

Random weights, one device, bf16 on GPU. ``hybrid`` is an ``HQwen3ForCausalLM`` with every other
layer Gated DeltaNet (GDN at odd layers: the ``alternate`` selection at 50%); ``teacher`` is
transformers' ``Qwen3ForCausalLM``. Both run through the same static-cache decoder
(``factory.models.hqwen3.decoding``): prefill with SDPA (any backend) and fla's chunked kernel,
decode as one CUDA graph per batch shape with flash attention over a preallocated KV cache and
fla's recurrent kernel, so the numbers compare architectures, not glue. For each context:

  prefill_ms          one sequence of ``context`` tokens into an empty cache
  decode_b1_tok_s     greedy decode at batch 1 after that prefill
  per_seq_bytes       cache bytes per sequence at ``context`` tokens (KV + GDN conv/recurrent state),
                      read from the allocator when a one-sequence cache is made
  max_batch           the most sequences whose caches (``context + decode_steps`` tokens) fit in the
                      memory left after the weights, less ``--reserve-gib`` for activations; found
                      from free memory, then shrunk until allocation and a captured step succeed
  decode_max_tok_s    decode tokens/s at ``max_batch`` (caches not prefilled: filling 100+ sequences
                      of 128K tokens would take minutes, and attention's cost does not depend on
                      the values in the cache)

``--generate-context`` also times transformers' ``generate()`` per decode step at one context (the
path a user of the export takes), for the hybrid with and without cuDNN attention allowed in
decode steps (the issue-18 slow path) and for the teacher.

CUDA events, warmup, medians; a progress line per measurement, the JSON rewritten after each.
On CPU (the smoke test) times are wall clock and ``--cpu-memory-gib`` stands for free memory.

    python bench/bench_inference.py --shape 8b [--layers 36] [--contexts 4096,...,131072] --json out.json
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

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from transformers import Qwen3Config, Qwen3ForCausalLM  # noqa: E402

import factory.models.hqwen3.modeling_hqwen3 as modeling  # noqa: E402
from factory.models.hqwen3 import HQwen3Config, HQwen3ForCausalLM  # noqa: E402
from factory.models.hqwen3.decoding import Decoder, StaticCache  # noqa: E402
from timing import median_ms  # noqa: E402  (bench/ is the script's directory)

SHAPES = {
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=16, vocab_size=101),
    "8b": dict(hidden_size=4096, intermediate_size=12288, num_hidden_layers=36, num_attention_heads=32,
               num_key_value_heads=8, head_dim=128, vocab_size=151936),
    "32b": dict(hidden_size=5120, intermediate_size=25600, num_hidden_layers=64, num_attention_heads=64,
                num_key_value_heads=8, head_dim=128, vocab_size=151936),
}
GOALS = {"decode_saturated_128k": 2.0, "concurrency_128k": 1.9, "prefill_128k": 1.3}
_T0 = time.perf_counter()


def progress(msg: str) -> None:
    print(f"[{time.perf_counter() - _T0:7.1f}s] {msg}", flush=True)


def free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


def build(kind: str, shape: dict, device, dtype):
    n = shape["num_hidden_layers"]
    common = dict(**shape, max_position_embeddings=262144, rope_theta=5_000_000.0, tie_word_embeddings=False)
    if kind == "hybrid":
        types = ["linear_attention" if i % 2 else "full_attention" for i in range(n)]
        cls, config = HQwen3ForCausalLM, HQwen3Config(**common, layer_types=types)
    else:
        cls, config = Qwen3ForCausalLM, Qwen3Config(**common)
    with torch.device(device):
        model = cls._from_config(config, dtype=dtype, attn_implementation="sdpa")
    return model.eval()


# --------------------------------------------------------------------------- measurements

def decode_ms_per_step(decoder: Decoder, context: int, steps: int, warmup: int, iters: int, cuda: bool) -> float:
    start = torch.zeros(decoder.cache.batch, 1, dtype=torch.long, device=decoder.cache.device)

    def run():
        decoder.cache.length = context
        tok = start
        for _ in range(steps):
            tok = decoder.step(tok).argmax(-1, keepdim=True)

    return median_ms(run, warmup, iters, cuda) / steps


def allocated() -> int:
    return torch.cuda.memory_allocated() if torch.cuda.is_available() else 0


def prefill_and_decode(model, context: int, args, device, cuda: bool) -> dict:
    """Prefill time, decode at batch 1 and the measured cache bytes of one sequence."""
    free_memory()
    before = allocated()
    cache = StaticCache(model, 1, context)
    per_seq = allocated() - before if cuda else cache.nbytes()
    del cache
    free_memory()
    cache = StaticCache(model, 1, context + args.decode_steps + 1)
    decoder = Decoder(model, cache, cuda_graph=cuda and args.graph)
    ids = torch.randint(0, model.config.vocab_size, (1, context), device=device)
    long_ctx = context > 32768  # one timed prefill after the warm-up: each takes seconds there
    prefill_ms = median_ms(lambda: decoder.prefill(ids), 1, 1 if long_ctx else args.iters, cuda)
    try:
        step_ms = decode_ms_per_step(decoder, context, args.decode_steps, 1, args.iters, cuda)
    except RuntimeError as err:  # keep the run's other numbers if the captured step fails here
        if not decoder.cuda_graph:
            raise
        progress(f"captured decode failed ({str(err).splitlines()[0]}); eager decode from here on")
        args.graph = False
        decoder = Decoder(model, cache)
        step_ms = decode_ms_per_step(decoder, context, args.decode_steps, 1, args.iters, cuda)
    return {"graph": decoder.cuda_graph, "prefill_ms": prefill_ms, "decode_b1_ms_per_step": step_ms,
            "decode_b1_tok_s": 1e3 / step_ms,
            "per_seq_bytes": per_seq, "per_seq_gib": per_seq / 2**30}


def available_bytes(args, cuda: bool) -> int:
    free_memory()
    if cuda:
        return torch.cuda.mem_get_info()[0] - int(args.reserve_gib * 2**30)
    return int(args.cpu_memory_gib * 2**30)


def saturated_decode(model, context: int, args, cuda: bool) -> dict:
    """The largest batch whose caches fit, and its decode speed."""
    max_len = context + args.decode_steps + 1
    probe = StaticCache(model, 1, max_len)
    per_seq = probe.nbytes()
    del probe
    budget = available_bytes(args, cuda)
    batch = min(budget // per_seq, args.max_batch_cap) if args.max_batch_cap else budget // per_seq
    while batch >= 1:
        try:
            cache = StaticCache(model, int(batch), max_len)
            decoder = Decoder(model, cache, cuda_graph=cuda and args.graph)
            step_ms = decode_ms_per_step(decoder, context, args.decode_steps, 1, args.iters, cuda)
            return {"max_batch": int(batch), "decode_max_ms_per_step": step_ms,
                    "decode_max_tok_s": batch * 1e3 / step_ms, "budget_gib": budget / 2**30}
        except torch.OutOfMemoryError:
            cache = decoder = None
            free_memory()
            progress(f"  batch {batch} did not fit; shrinking")
            batch = int(batch * 0.95)
    return {"max_batch": 0}


def generate_ms_per_step(model, context: int, steps: int, device, cuda: bool) -> float:
    """transformers' generate(): (time of 1 + steps new tokens - time of 1) / steps."""
    ids = torch.randint(1, model.config.vocab_size, (1, context), device=device)

    def gen(n):
        return lambda: model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                                      do_sample=False, pad_token_id=0)

    return (median_ms(gen(steps + 1), 1, 2, cuda) - median_ms(gen(1), 1, 2, cuda)) / steps


def generate_rows(kind: str, model, args, device, cuda: bool) -> dict:
    L, steps = args.generate_context, args.decode_steps
    row = {"generate_context": L, "generate_ms_per_step": generate_ms_per_step(model, L, steps, device, cuda)}
    progress(f"{kind} generate() at {L}: {row['generate_ms_per_step']:.2f} ms/step")
    if kind == "hybrid":  # the slow path issue 18 found: cuDNN attention allowed in decode steps
        fixed = modeling.DECODE_SDPA_BACKENDS
        modeling.DECODE_SDPA_BACKENDS = [torch.nn.attention.SDPBackend.CUDNN_ATTENTION, *fixed]
        try:
            row["generate_cudnn_ms_per_step"] = generate_ms_per_step(model, L, steps, device, cuda)
        finally:
            modeling.DECODE_SDPA_BACKENDS = fixed
        progress(f"{kind} generate() at {L}, cuDNN allowed: {row['generate_cudnn_ms_per_step']:.2f} ms/step")
    return row


# --------------------------------------------------------------------------- driver

def ratios(rows: list[dict]) -> dict:
    """hybrid / teacher per context (speed-ups > 1 favour the hybrid)."""
    by = {(r["model"], r["context"]): r for r in rows}
    out = {}
    for (model, L), h in by.items():
        t = by.get(("teacher", L))
        if model != "hybrid" or t is None:
            continue
        r = {}
        if "prefill_ms" in h and "prefill_ms" in t:
            r["prefill_speedup"] = t["prefill_ms"] / h["prefill_ms"]
            r["decode_b1"] = h["decode_b1_tok_s"] / t["decode_b1_tok_s"]
            r["per_seq_memory"] = h["per_seq_bytes"] / t["per_seq_bytes"]
        if h.get("max_batch") and t.get("max_batch"):
            r["concurrency"] = h["max_batch"] / t["max_batch"]
            r["decode_saturated"] = h["decode_max_tok_s"] / t["decode_max_tok_s"]
        out[str(L)] = r
    return out


def meta(args, device) -> dict:
    import transformers

    info = {"args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
            "device": str(device), "torch": torch.__version__,
            "transformers": transformers.__version__, "python": platform.python_version()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
        info["gpu_memory_gib"] = torch.cuda.get_device_properties(0).total_memory / 2**30
        try:
            import fla
            import triton

            info["fla"], info["triton"] = fla.__version__, triton.__version__
        except ImportError:
            pass
    return info


def measure(kind, L, args, device, dtype, cuda, results, save):
    """One model at one context; the model is built afresh so that it alone holds memory."""
    shape = dict(SHAPES[args.shape], num_hidden_layers=args.layers or SHAPES[args.shape]["num_hidden_layers"])
    torch.manual_seed(0)
    model = build(kind, shape, device, dtype)
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    with torch.no_grad():
        if args.generate_context and not any(r["model"] == kind and r["kind"] == "generate" for r in results["rows"]):
            results["rows"].append({"model": kind, "context": args.generate_context, "kind": "generate",
                                    **generate_rows(kind, model, args, device, cuda)})
            save()
        row = {"model": kind, "context": L, "kind": "static", "layers": shape["num_hidden_layers"],
               "weights_gib": weights / 2**30}
        results["rows"].append(row)
        row.update(prefill_and_decode(model, L, args, device, cuda))
        progress(f"{kind} {L:>6}: prefill {row['prefill_ms']:.1f} ms, decode b1 {row['decode_b1_tok_s']:.1f} tok/s, "
                 f"{row['per_seq_gib']:.3f} GiB/seq")
        save()
        row.update(saturated_decode(model, L, args, cuda))
        progress(f"{kind} {L:>6}: max batch {row['max_batch']}, {row.get('decode_max_tok_s', 0):.1f} tok/s")
        save()
    del model
    free_memory()


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", choices=sorted(SHAPES), default="8b")
    p.add_argument("--layers", type=int, default=0, help="decoder layers (0: the shape's own depth)")
    p.add_argument("--contexts", default="4096,16384,32768,65536,131072")
    p.add_argument("--models", default="hybrid,teacher")
    p.add_argument("--decode-steps", type=int, default=16)
    p.add_argument("--iters", type=int, default=3)
    p.add_argument("--reserve-gib", type=float, default=2.0, help="GPU memory kept back for activations")
    p.add_argument("--cpu-memory-gib", type=float, default=0.05, help="memory for caches on CPU (smoke test)")
    p.add_argument("--max-batch-cap", type=int, default=0, help="upper bound on the saturated batch (0: none)")
    p.add_argument("--generate-context", type=int, default=0, help="also time generate() here (0: skip)")
    p.add_argument("--no-graph", dest="graph", action="store_false", help="eager decode steps on GPU")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    args.contexts = [int(c) for c in args.contexts.split(",")]
    models = args.models.split(",")
    if unknown := sorted(set(models) - {"hybrid", "teacher"}):
        p.error(f"unknown model(s) {unknown}; accepted: hybrid, teacher")
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    dtype = torch.bfloat16 if cuda else torch.float32
    results = {"meta": meta(args, device), "goals": GOALS, "rows": []}

    def save():
        results["ratios"] = ratios([r for r in results["rows"] if r.get("kind") == "static"])
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(results, indent=1))

    for L in args.contexts:  # contexts outermost: each finished context has its ratios
        for kind in models:
            measure(kind, L, args, device, dtype, cuda, results, save)
    save()
    for L, r in results["ratios"].items():
        progress(f"hybrid/teacher at {L}: " + ", ".join(f"{k} {v:.2f}x" for k, v in r.items()))
    return results


if __name__ == "__main__":
    main()
