"""Long-context training step under sequence parallelism (issue 6). One process per GPU; the SP
degree is the world size (one SP group).

Arms, at Qwen3-8B shape (hidden 4096, 32 query / 8 KV heads, head dim 128, FFN 12288, vocab
151936; ``--layers`` of them, half GDN, random weights):

  hybrid_head_parallel  50% hybrid, GDN head-parallel all-to-all around convs + kernel (shipped)
  hybrid_allgather      the same model, GDN all-gathering the whole rows on every rank (the
                        published pipeline's way; the baseline of the issue)
  transformer           every layer attention (Ulysses all-to-all)

A step is what the longctx stage runs: forward+backward of its next-token loss (sequence tiled,
``next_token_sum``) on this rank's slice of one row, activation checkpointing, RoPE theta 5M,
trainable set ``gdn+norms+attention``; no optimizer step. Unlike the stage, weights are
replicated on every rank (no ZeRO), so the figures isolate sequence parallelism.

Times are medians of CUDA-event-timed steps after warmup (wall clock on CPU); memory is freed
between sizes; a progress line with wall-clock seconds follows every measurement; ``--json``
is rewritten after every measurement. bf16 on CUDA (NCCL), fp32 on CPU (gloo). All arms run in
one process group; Triton compiles fla's kernels in an extra warm-up step at the smallest size,
once per GDN arm (fla specializes its kernels on the head count: 8 per rank head-parallel at
SP=4, all 32 all-gathered); row length is not a specialization key, so larger sizes should not
compile again (not yet seen on a GPU).

    torchrun --nproc_per_node 4 bench/bench_longctx_sp.py --json sp.json
    torchrun --nproc_per_node 4 bench/bench_longctx_sp.py --find-max --find-max-refine 2 --json max.json
    torchrun --nproc_per_node 2 bench/bench_longctx_sp.py --tiny --tokens 256,512     # CPU smoke

Goals (issue 6): longest trainable row >= 512K tokens on 4 H100s with SP=4; hybrid >= 1.5x
faster than the Transformer at 128K; head-parallel >= 1.6x faster than all-gather at 128K.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import platform
import sys
import time
from datetime import timedelta
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from factory.config.schema import PrimeConfig  # noqa: E402
from factory.data.packing import IGNORE_INDEX  # noqa: E402
from factory.distributed.sequence_parallel import build_sequence_parallel  # noqa: E402
from factory.models.hqwen3 import HQwen3Config, HQwen3ForCausalLM  # noqa: E402
from factory.priming.select import alternate_layers  # noqa: E402
from factory.distributed.parallelize import parallelize  # noqa: E402
from factory.models.hqwen3.student import extend_context  # noqa: E402
from factory.stages.training import next_token_sum  # noqa: E402
from factory.train.trainable import select_trainable  # noqa: E402
from timing import median_ms  # noqa: E402  (bench/ is the script's directory)

QWEN3_8B = dict(hidden_size=4096, num_attention_heads=32, num_key_value_heads=8, head_dim=128,
                intermediate_size=12288, vocab_size=151936)
TINY = dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=16, intermediate_size=128,
            vocab_size=512)
ARMS = {"hybrid_head_parallel": ("hybrid", "head_parallel"), "hybrid_allgather": ("hybrid", "allgather"),
        "transformer": ("transformer", "head_parallel")}
ROPE_THETA = 5_000_000  # the 128K recipe's base
STAGE = PrimeConfig().longctx  # the longctx stage's defaults: trainable set, loss tile
GOALS = {"longest_row": 524288, "transformer_over_hybrid_128k": 1.5, "allgather_over_head_parallel_128k": 1.6}
_T0 = time.perf_counter()


def build_model(kind: str, args, sp, device, dtype):
    """Random-weight model of the benchmark shape, set up as the longctx stage sets up its student."""
    shape = TINY if args.tiny else QWEN3_8B
    gdn = alternate_layers(0.5, args.layers) if kind == "hybrid" else []
    config = HQwen3Config(**shape, num_hidden_layers=args.layers, tie_word_embeddings=False, rms_norm_eps=1e-6,
                          layer_types=["linear_attention" if i in gdn else "full_attention"
                                       for i in range(args.layers)])
    torch.manual_seed(0)
    with torch.device(device):
        model = HQwen3ForCausalLM(config)
    model.to(dtype).train()
    extend_context(model, ROPE_THETA, args.max_tokens)
    parallelize(model, sp, args.tiled_mlp_tokens, activation_checkpointing=True,
                offload_checkpoints=args.offload_checkpoints)
    select_trainable(model, args.trainable)
    return model


def make_row(T: int, docs: int, vocab: int, device) -> dict:
    """One row of ``docs`` equal documents (positions restart at each), random tokens."""
    gen = torch.Generator().manual_seed(T)
    ids = torch.randint(0, vocab, (1, T), generator=gen)
    bounds = [T * i // docs for i in range(docs + 1)]
    positions = torch.cat([torch.arange(e - s) for s, e in zip(bounds[:-1], bounds[1:])])[None]
    labels = torch.roll(ids, -1, dims=1)
    labels[torch.roll(positions, -1, dims=1) == 0] = IGNORE_INDEX  # no target across documents
    return {k: v.to(device) for k, v in {"input_ids": ids, "position_ids": positions, "labels": labels}.items()}


def train_step(model, sp, row: dict, tile_tokens: int) -> None:
    # next_token_sum asks its stage context only whether weights are ZeRO-3 shards (they are not).
    ctx = SimpleNamespace(zero3=False, gathered=lambda params: contextlib.nullcontext())
    total, count = next_token_sum(ctx, model, sp.shard(row), tile_tokens)
    sp.global_mean(total, count).backward()
    model.zero_grad(set_to_none=True)


def free_memory(cuda: bool) -> None:
    gc.collect()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def measure(model, sp, T: int, args, device, warmup: int, iters: int) -> dict | None:
    """Median step ms at row length ``T`` and every rank's peak memory; None when any rank ran out
    of memory (all ranks agree, so none waits alone in a collective)."""
    cuda = device.type == "cuda"
    sp.check(model.config, T)
    free_memory(cuda)
    row = make_row(T, args.docs, model.config.vocab_size, device)
    ms = None
    try:
        ms = median_ms(lambda: train_step(model, sp, row, args.loss_tile_tokens), warmup, iters, cuda)
    except torch.OutOfMemoryError:
        model.zero_grad(set_to_none=True)  # the step's graph goes with the exception, after this block
    failed = torch.tensor([float(ms is None)], device=device)
    dist.all_reduce(failed)
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if cuda else None
    peaks = [None] * dist.get_world_size()
    dist.all_gather_object(peaks, peak)
    del row
    free_memory(cuda)
    if failed.item():
        return None
    return {"tokens": T, "step_ms": round(ms, 2), "tokens_per_s": round(T / ms * 1e3, 1),
            "tokens_per_s_per_gpu": round(T / ms * 1e3 / sp.degree, 1),
            "peak_gib_per_rank": [None if p is None else round(p, 2) for p in peaks]}


def progress(arm: str, T: int, result: dict | None, what: str = "") -> None:
    if dist.get_rank():
        return
    if result is None:
        shown = "out of memory"
    else:
        peaks = [p for p in result["peak_gib_per_rank"] if p is not None]
        shown = (f"{result['step_ms']:.1f} ms/step, {result['tokens_per_s']:,.0f} tok/s"
                 + (f", peak {max(peaks):.2f} GiB" if peaks else ""))
    print(f"  [{time.perf_counter() - _T0:7.1f} s] {arm} T={T}{what}: {shown}", flush=True)


def run_sizes(arm: str, model, sp, args, device, report: dict) -> None:
    """The first size pays one extra warm-up step (the compile), then every size is timed."""
    for i, T in enumerate(sorted(args.tokens)):
        result = measure(model, sp, T, args, device, args.warmup + (i == 0), args.iters)
        progress(arm, T, result)
        report["rows"].append({"arm": arm, "tokens": T, **(result or {"oom": True})})
        write_json(report, args)


def longest_row_search(fits, start: int, limit: int, refine: int = 0, multiple: int = 1) -> tuple[int | None, str]:
    """Double the row from ``start`` while ``fits(T)`` and ``T <= limit``; then ``refine`` times try
    the middle of the gap between the longest fit and the first failure (rounded down to
    ``multiple``). Returns the longest row that fit (None: not even ``start``) and what stopped the
    doubling."""
    longest, failed, T = None, None, start
    while T <= limit:
        if not fits(T):
            failed = T
            break
        longest, T = T, 2 * T
    for _ in range(refine if longest is not None and failed is not None else 0):
        middle = (longest + failed) // 2 // multiple * multiple
        if middle <= longest:
            break
        if fits(middle):
            longest = middle
        else:
            failed = middle
    return longest, "--max-tokens" if failed is None else "out of memory"


def find_max(arm: str, model, sp, args, device, report: dict) -> None:
    """The longest row that trains: ``longest_row_search`` with one measured step per length."""
    warm = measure(model, sp, min(args.tokens), args, device, 0, 1)  # compiles, at the smallest size
    progress(arm, min(args.tokens), warm, " (warm-up)")

    def fits(T: int) -> bool:
        result = measure(model, sp, T, args, device, 0, 1)
        progress(arm, T, result, " (find-max)")
        report["rows"].append({"arm": arm, "tokens": T, "find_max": True, **(result or {"oom": True})})
        write_json(report, args)  # a search cut short by the call's time limit keeps what it found
        return result is not None

    # Lengths stay divisible by the SP degree and whole chunks (64 tokens) of fla's kernels per rank.
    longest, stopped_by = longest_row_search(fits, args.find_max_from, args.max_tokens, args.find_max_refine,
                                             64 * sp.degree)
    report["longest_row"][arm] = longest
    report["find_max_stopped_by"][arm] = stopped_by
    write_json(report, args)


def goals(report: dict) -> dict:
    """The issue's goals, from whatever this run measured (None: not measured)."""
    ms = {(r["arm"], r["tokens"]): r.get("step_ms") for r in report["rows"] if not r.get("find_max")}

    def ratio(slow, fast, T=131072):
        a, b = ms.get((slow, T)), ms.get((fast, T))
        return round(a / b, 3) if a and b else None

    found = {"transformer_over_hybrid_128k": ratio("transformer", "hybrid_head_parallel"),
             "allgather_over_head_parallel_128k": ratio("hybrid_allgather", "hybrid_head_parallel"),
             "longest_row": report["longest_row"].get("hybrid_head_parallel")}
    met = {k: None if v is None else v >= GOALS[k] for k, v in found.items()}
    return {"targets": GOALS, "found": found, "met": met,
            "note": "the longest-row goal is for 4 H100s (SP=4); world_size is in the environment"}


def write_json(report: dict, args) -> None:
    if args.json is None or dist.get_rank():
        return
    report["goals"] = goals(report)
    tmp = args.json.with_suffix(".tmp")
    tmp.write_text(json.dumps(report, indent=1))
    tmp.replace(args.json)


def environment(device, dtype) -> dict:
    env = {"python": platform.python_version(), "torch": torch.__version__, "world_size": dist.get_world_size(),
           "backend": dist.get_backend(), "device": str(device), "dtype": str(dtype)}
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
    for package in ("fla", "flash_attn", "triton", "transformers"):
        try:
            env[package] = __import__(package).__version__
        except Exception:  # not installed (or no driver): record its absence
            env[package] = None
    return env


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", default="32768,65536,131072", help="row lengths (whole rows, all ranks)")
    parser.add_argument("--arms", default=",".join(ARMS), help=f"comma-separated from {', '.join(ARMS)}")
    parser.add_argument("--layers", type=int, default=4, help="decoder layers (Qwen3-8B has 36), half GDN")
    parser.add_argument("--docs", type=int, default=1, help="documents per row (attention per document)")
    parser.add_argument("--trainable", default=STAGE.trainable)
    parser.add_argument("--tiled-mlp-tokens", type=int, default=0,
                        help="MLP sequence tile per rank (ALST; the stage's longctx.tiled_mlp_tokens); 0: whole rows")
    parser.add_argument("--offload-checkpoints", action="store_true",
                        help="keep activation checkpoints in CPU memory (the stage's longctx.offload_checkpoints)")
    parser.add_argument("--loss-tile-tokens", type=int, default=STAGE.loss_tile_tokens, help="loss sequence tile")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--iters", type=int, default=3)
    parser.add_argument("--find-max", action="store_true", help="double the row from --find-max-from until OOM")
    parser.add_argument("--find-max-from", type=int, default=131072, help="first row length of --find-max")
    parser.add_argument("--max-tokens", type=int, default=4194304, help="longest row tried (and RoPE positions)")
    parser.add_argument("--find-max-refine", type=int, default=0,
                        help="after the doubling fails, this many bisection steps between the last fit and the failure")
    parser.add_argument("--tiny", action="store_true", help="tiny shape (hidden 64, vocab 512): CPU smoke runs")
    parser.add_argument("--timeout-min", type=float, default=15, help="collective timeout (a rank stuck alone)")
    parser.add_argument("--json", type=Path, help="write environment, rows and goals here (after every row)")
    args = parser.parse_args(argv)
    args.tokens = [int(t) for t in args.tokens.split(",")]
    args.arms = args.arms.split(",")
    unknown = [a for a in args.arms if a not in ARMS]
    if unknown:
        parser.error(f"unknown arm(s) {unknown}; accepted: {', '.join(ARMS)}")
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    cuda = torch.cuda.is_available()
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if cuda:
        torch.cuda.set_device(local_rank)
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    dtype = torch.bfloat16 if cuda else torch.float32
    dist.init_process_group("nccl" if cuda else "gloo", timeout=timedelta(minutes=args.timeout_min))
    world = dist.get_world_size()
    sp = build_sequence_parallel(dist.get_rank(), world, world)
    settings = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    report = {"environment": environment(device, dtype), "args": settings, "sp_degree": world, "rows": [],
              "longest_row": {}, "find_max_stopped_by": {}}
    if dist.get_rank() == 0:
        print("environment:", json.dumps(report["environment"]), flush=True)
    for kind in ("hybrid", "transformer"):
        arms = [a for a in args.arms if ARMS[a][0] == kind]
        if not arms:
            continue
        model = build_model(kind, args, sp, device, dtype)
        for arm in arms:
            sp.gdn_mode = ARMS[arm][1]
            (find_max if args.find_max else run_sizes)(arm, model, sp, args, device, report)
        del model
        free_memory(cuda)
    write_json(report, args)
    if dist.get_rank() == 0:
        print("goals:", json.dumps(goals(report)), flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
