"""Training throughput under DeepSpeed ZeRO-3 (issue 5; issue 7 at the Qwen3-32B shape).

Five arms, each a fresh sharded model timed for ``--steps`` optimizer steps after ``--warmup``:

  align     the align stage's step: a 50% hybrid (alternate layers) that keeps the teacher attention
            in converted layers, only GDN trainable, the stage's alignment loss (``--align-loss``)
  distill   the distill stage's step: the hybrid student (``--distill-trainable``, default the
            recipe's ``gdn``; ``all`` trains the LM head, which the stage refuses under ZeRO-3),
            the all-attention teacher as a second ZeRO engine without optimizer, tiled forward KL
  distill_shared  the distill stage's shared-teacher step (issue 17, trainable=gdn): one hybrid that keeps
            the converted layers' attention; the teacher is a no-grad stream through it beside the
            student's in each layer (``distill.teacher_stream=per_layer``), one LM head
  distill_shared_whole  the same with the teacher stream as a pass of its own before the student's
            (``distill.teacher_stream=whole``)
  baseline  the all-attention Transformer of the same shape, everything trainable, next-token loss
            (the sft/longctx step), under the same ZeRO-3 settings

Everything runs through the project's own code: models (``factory.models.hqwen3`` and
transformers' Qwen3), random weights built sharded under ``zero.Init`` (``zero3_loading``: no rank
ever holds a whole model), ZeRO config rendering, ``DeepSpeedTrainEngine`` and ``frozen_engine``,
``select_trainable``, the stage losses and ``train_loop``. One row of ``--seq-len`` tokens per GPU
per step (micro-batch 1, no accumulation); each rank reads its own row.

MFU = FLOPs per token x tokens/s per GPU / (``--peak-tflops`` x 1e12). FLOPs per token count
matmuls only, 2 per multiply-add, as actually computed:
  - every nn.Linear weight W (lm_head included; embeddings, norms and convs not): 2W forward,
    2W for its input gradient where autograd computes one, 2W for its weight gradient where W trains;
  - causal attention scores (QK^T and PV, T/2 keys on average): 2*H*d*T forward, twice that backward;
  - the GDN chunked kernel (chunk C=64, per token): H*(6*dk*dv + C*(6*dk + 4*dv)) forward, twice
    that backward;
  - input gradients run from the first layer that holds a trainable parameter upward, whole layers
    (that layer's input projections are counted although autograd skips them) plus the LM head;
  - align ``layerwise`` detaches each GDN input and its target is the no-grad attention output, so
    its backward is the GDN layers alone: weight gradients, o_proj's input gradient, the kernel;
    its forward is every layer's attention (kept teacher attention included), MLP and GDN, no head;
  - the distill teacher counts its forward (stack and LM head; the per-layer stream, which runs the
    layers below the first converted one once for both streams, from that layer up); activation
    checkpointing recomputation, elementwise work and the optimizer are not counted.
Scaling efficiency (``--report``) = tokens/s per GPU at N GPUs / tokens/s per GPU at 1 GPU (or at the
fewest GPUs among the merged runs, e.g. 4 for the 32B shape).

All arms share one process group (fla's Triton kernels JIT-compile once per process).

    torchrun --nproc_per_node 4 bench/bench_zero3_throughput.py --shape 8b --label 4gpu --json r4.json
    DS_ACCELERATOR=cpu OMP_NUM_THREADS=1 torchrun --nproc_per_node 2 bench/bench_zero3_throughput.py \\
        --shape tiny --seq-len 256 --steps 2 --warmup 1 --json /tmp/z.json
    python bench/bench_zero3_throughput.py --report r1.json r2.json r4.json [--json merged.json]
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import statistics
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from flops import align_flops, lm_flops, numel, stack_flops  # noqa: E402

ARMS = ("align", "distill", "distill_shared", "distill_shared_whole", "baseline")
GOALS = {"distill_mfu_at_8k": 0.40, "scaling_1_to_4": 0.85}
# Qwen3 shapes (config.json of Qwen/Qwen3-8B and -32B; tiny = the embedded teacher in assets/).
SHAPES = {
    "tiny": dict(hidden_size=128, intermediate_size=384, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                 vocab_size=2048, num_hidden_layers=8, rope_theta=10_000.0),
    "8b": dict(hidden_size=4096, intermediate_size=12288, num_attention_heads=32, num_key_value_heads=8,
               head_dim=128, vocab_size=151936, num_hidden_layers=36, rope_theta=1_000_000.0),
    "32b": dict(hidden_size=5120, intermediate_size=25600, num_attention_heads=64, num_key_value_heads=8,
                head_dim=128, vocab_size=151936, num_hidden_layers=64, rope_theta=1_000_000.0),
}
DEFAULT_LAYERS = {"tiny": 8, "8b": 8, "32b": 64}
_T0 = time.perf_counter()


# --------------------------------------------------------------------------- models and arms

def model_config(args, kind: str):
    """Config of the requested shape. ``teacher``: Qwen3, as the distill stage loads the teacher;
    ``baseline``: HQwen3 with every layer attention (Qwen3's modules and math, and the project's
    trainable-set code applies); ``hybrid``: 50% GDN on alternate layers as ``select.method=alternate``
    picks them; ``align``: that hybrid keeping the teacher attention, as the init stage writes it."""
    from transformers import Qwen3Config

    from factory.models.hqwen3 import HQwen3Config
    from factory.priming.select import alternate_layers

    shape = {**SHAPES[args.shape], "num_hidden_layers": args.layers}
    theta = shape.pop("rope_theta")
    common = dict(**shape, max_position_embeddings=max(args.seq_len, 40960), tie_word_embeddings=False,
                  rope_parameters={"rope_type": "default", "rope_theta": theta}, rms_norm_eps=1e-6)
    if kind == "teacher":
        return Qwen3Config(**common)
    gdn = set(alternate_layers(0.5, args.layers)) if kind != "baseline" else set()
    types = ["linear_attention" if i in gdn else "full_attention" for i in range(args.layers)]
    return HQwen3Config(**common, layer_types=types, keep_teacher_attention=kind == "align")


def build(kind: str, args, run):
    """Random weights, built sharded (``zero.Init`` through ``zero3_loading``) as the stages load."""
    from transformers import Qwen3ForCausalLM

    from factory.distributed.engine import zero3_loading
    from factory.models.hqwen3 import HQwen3ForCausalLM

    cls = Qwen3ForCausalLM if kind == "teacher" else HQwen3ForCausalLM
    with zero3_loading(run["ds"], run["precision"]):
        model = cls._from_config(model_config(args, kind), dtype=torch.float32, attn_implementation="sdpa")
    return model.to(run["device"])


def arm_align(args, run) -> dict:
    from factory.stages.align import align_loss_fn
    from factory.train.trainable import select_trainable

    model = build("align", args, run)
    params = select_trainable(model, "gdn")
    return {"model": model, "params": params, "loss_fn": align_loss_fn(model, args.align_loss),
            "flops": align_flops(model, args.seq_len, args.align_loss)}


def arm_distill(args, run) -> dict:
    from factory.distributed.engine import frozen_engine
    from factory.stages.distill import distill_loss_fn
    from factory.train.trainable import select_trainable

    student = build("hybrid", args, run)
    teacher = build("teacher", args, run).eval().requires_grad_(False)
    teacher = frozen_engine(teacher, run["ds"], run["precision"], 1, step_module="model")
    params = select_trainable(student, args.distill_trainable)
    flops = lm_flops(student, args.seq_len)
    teacher_forward, _ = stack_flops(teacher, args.seq_len, "teacher")
    flops["teacher_forward"] = teacher_forward + 2 * numel(teacher.lm_head.weight)
    return {"model": student, "params": params, "flops": flops, "teacher": teacher,
            "loss_fn": distill_loss_fn(run["ctx"], run["stage"], student, teacher)}


def arm_distill_shared(args, run, stream: str = "per_layer") -> dict:
    from factory.stages.distill import shared_loss_fn
    from factory.train.trainable import select_trainable

    model = build("align", args, run)  # the hybrid keeping the converted layers' attention
    params = select_trainable(model, "gdn")
    flops = lm_flops(model, args.seq_len)
    # per_layer runs the layers below the first converted one once for both streams
    teacher_forward, _ = stack_flops(model, args.seq_len, "teacher", from_first_linear=stream == "per_layer")
    flops["teacher_forward"] = teacher_forward + 2 * numel(model.lm_head.weight)
    return {"model": model, "params": params, "flops": flops,
            "loss_fn": shared_loss_fn(run["ctx"], dataclasses.replace(run["stage"], teacher_stream=stream), model)}


def arm_baseline(args, run) -> dict:
    from factory.stages.training import next_token_sum
    from factory.train.trainable import select_trainable

    model = build("baseline", args, run)
    params = select_trainable(model, "all")

    def next_token(batch):
        total, count = next_token_sum(run["ctx"], model, batch, run["stage"].loss_tile_tokens)
        return total / max(1, count), {}

    return {"model": model, "params": params, "loss_fn": next_token, "flops": lm_flops(model, args.seq_len)}


ARM_SETUP = {"align": arm_align, "distill": arm_distill, "distill_shared": arm_distill_shared,
             "distill_shared_whole": partial(arm_distill_shared, stream="whole"), "baseline": arm_baseline}


class FixedRow:
    """One random row per rank, served every step, so the data path costs nothing measurable."""

    def __init__(self, seq_len: int, vocab: int, rank: int):
        from factory.data.packing import IGNORE_INDEX

        ids = torch.randint(0, vocab, (1, seq_len), generator=torch.Generator().manual_seed(rank))
        labels = torch.roll(ids, -1, dims=1)
        labels[:, -1] = IGNORE_INDEX
        self.batch = {"input_ids": ids, "position_ids": torch.arange(seq_len)[None], "labels": labels}

    def next_batch(self) -> dict:  # the loop's loader interface
        return self.batch


class StepTimer:
    """A loop callback: seconds of each optimizer step, the device synchronized at each boundary."""

    def __init__(self, device: torch.device):
        self.device, self.seconds = device, []
        self._last = self._now()

    def _now(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    def on_step(self, state) -> None:
        now = self._now()
        self.seconds.append(now - self._last)
        self._last = now

    def on_end(self, state) -> None:
        pass


# --------------------------------------------------------------------------- one arm

def time_arm(arm: str, args, run) -> dict:
    """Build the arm, train ``warmup + steps`` steps through the project's loop, free everything."""
    from factory.distributed.engine import DeepSpeedTrainEngine, release_modules
    from factory.distributed.parallelize import parallelize
    from factory.train.loop import train_loop

    device, env = run["device"], run["env"]
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    torch.manual_seed(0)  # the same random weights in every arm of a shape (the shared arms compare losses)
    setup = ARM_SETUP[arm](args, run)
    model = setup["model"]
    parallelize(model, activation_checkpointing=args.activation_checkpointing)
    engine = DeepSpeedTrainEngine(model, setup["params"], run["stage"], run["ds"], run["precision"], env)
    model.train()
    timer = StepTimer(device)
    state = train_loop(engine, FixedRow(args.seq_len, model.config.vocab_size, env.rank), setup["loss_fn"],
                       run["stage"].steps, 1, [timer], device, data_parallel_size=env.world_size)
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    result = {"seconds": timer.seconds[args.warmup:], "peak_gib": peak, "loss": state.loss,
              "flops": setup["flops"], "trainable_params": sum(numel(p) for _, p in setup["params"]),
              "params": sum(numel(p) for p in model.parameters())}
    engine.engine.destroy()
    release_modules([model, setup.get("teacher")])
    del engine, setup, model, state
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        result["left_allocated_gib"] = torch.cuda.memory_allocated(device) / 2**30
    return result


def summarize(per_rank: list[dict], args, cuda: bool) -> dict:
    """Step time of the slowest rank at each step, then the median over steps."""
    steps = [max(times) for times in zip(*(r["seconds"] for r in per_rank))]
    median, first = statistics.median(steps), per_rank[0]
    flops = first["flops"]
    per_token = flops["forward"] + flops["backward"] + flops.get("teacher_forward", 0.0)
    tokens = args.seq_len / median
    peaks = [r["peak_gib"] for r in per_rank]
    return {"step_seconds_median": median, "step_seconds": steps, "tokens_per_s_per_gpu": tokens,
            "flops_per_token": per_token, "flops_per_token_parts": flops,
            "mfu": per_token * tokens / (args.peak_tflops * 1e12) if cuda else None,
            "peak_memory_gib": max(peaks) if cuda else None, "peak_memory_gib_per_rank": peaks if cuda else None,
            "left_allocated_gib": first.get("left_allocated_gib"), "final_loss": first["loss"],
            "params": first["params"], "trainable_params": first["trainable_params"]}


# --------------------------------------------------------------------------- one launch

# The docstring's formula, one line, for the console and the JSON.
MFU_FORMULA = " ".join(__doc__[__doc__.index("MFU = "):__doc__.index("Scaling efficiency")].split())


def setup_run(args) -> dict:
    from factory.config.schema import DeepSpeedConfig, DistillConfig, OptimConfig, PrimeConfig
    from factory.distributed.env import init_distributed
    from factory.stages.context import StageContext

    env = init_distributed()
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", env.local_rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    precision = "bf16" if cuda else "fp32"  # the pipeline's "auto"
    ds = DeepSpeedConfig(enabled=True, offload_optimizer=args.offload_optimizer)
    stage = DistillConfig(steps=args.warmup + args.steps, batch_size=1, loss_tile_tokens=args.tile_tokens,
                          optim=OptimConfig(), plot=False)
    # The stage losses read ZeRO-3 state (gathered LM heads) from a stage context.
    ctx = StageContext(cfg=PrimeConfig(deepspeed=ds), name="distill", stage_dir=Path(tempfile.gettempdir()),
                       parent_dir=None, device=device, precision=precision, env=env, ranks="all")
    return {"env": env, "device": device, "precision": precision, "ds": ds, "stage": stage, "ctx": ctx}


def header(args, run) -> dict:
    from factory.layers.gdn import GatedRMSNorm
    from factory.priming.select import alternate_layers

    cuda = run["device"].type == "cuda"
    settings = {k: v for k, v in vars(args).items() if k not in ("report", "json", "label")}
    return {"label": args.label, "world_size": run["env"].world_size,
            "device": torch.cuda.get_device_name(run["device"]) if cuda else "cpu",
            "shape": args.shape, "layers": args.layers, "seq_len": args.seq_len, "micro_batch": 1,
            "model": {**SHAPES[args.shape], "num_hidden_layers": args.layers},
            "gdn_layers": alternate_layers(0.5, args.layers), "precision": run["precision"], "settings": settings,
            "gdn_norm_fused_on_cuda": GatedRMSNorm.fused_on_cuda, "zero": vars(run["ds"]),
            "mfu_formula": MFU_FORMULA, "arms": {}}


def versions() -> dict:
    """Versions of what ran (fla is imported at the first CUDA kernel call, so read after an arm)."""
    import transformers

    found = {"torch": torch.__version__, "transformers": transformers.__version__}
    for name in ("deepspeed", "triton", "fla"):
        found[name] = getattr(sys.modules.get(name), "__version__", None)
    return found


def gather(result: dict, env) -> list[dict]:
    import torch.distributed as dist

    if env.world_size == 1:
        return [result]
    everyone = [None] * env.world_size
    dist.all_gather_object(everyone, result)
    return everyone


def progress(arm: str, r: dict) -> None:
    gib = lambda x: "n/a" if x is None else f"{x:.2f} GiB"  # noqa: E731
    mfu = "n/a (no GPU)" if r["mfu"] is None else f"{100 * r['mfu']:.1f}%"
    print(f"[{time.perf_counter() - _T0:8.1f} s] {arm}: {r['step_seconds_median']:.3f} s/step, "
          f"{r['tokens_per_s_per_gpu']:,.0f} tokens/s/GPU, MFU {mfu}, peak {gib(r['peak_memory_gib'])}, "
          f"left allocated after freeing {gib(r['left_allocated_gib'])}", flush=True)


def write_json(path: str | None, data: dict) -> None:
    if path:
        Path(path).write_text(json.dumps(data, indent=1) + "\n")


def run_benchmark(args) -> None:
    run = setup_run(args)
    env, cuda = run["env"], run["device"].type == "cuda"
    result = header(args, run)
    if env.is_main:
        print(f"[{time.perf_counter() - _T0:8.1f} s] {args.shape} x {args.layers} layers, {args.seq_len} tokens/row, "
              f"{env.world_size} rank(s) on {result['device']}; arms {', '.join(args.arms)}", flush=True)
    for arm in args.arms:
        per_rank = gather(time_arm(arm, args, run), env)
        if env.is_main:
            result["arms"][arm] = summarize(per_rank, args, cuda)
            progress(arm, result["arms"][arm])
            result["versions"] = versions()
            write_json(args.json, result)  # after every arm, so a later failure keeps what ran
    if env.is_main:
        print(MFU_FORMULA, flush=True)


# --------------------------------------------------------------------------- --report

def scaling_rows(runs: list[dict]) -> list[dict]:
    """Per arm and GPU count; scaling against the fewest GPUs run (1 for issue 5)."""
    base_run, rows = runs[0], []
    for arm in ARMS:
        for r in runs:
            a = r["arms"].get(arm)
            if a is None:
                continue
            base = base_run["arms"].get(arm)
            shown = ("step_seconds_median", "tokens_per_s_per_gpu", "mfu", "peak_memory_gib")
            rows.append({"arm": arm, "gpus": r["world_size"], "base_gpus": base_run["world_size"], "label": r["label"],
                         "device": r["device"], **{k: a[k] for k in shown}, "scaling_efficiency":
                         a["tokens_per_s_per_gpu"] / base["tokens_per_s_per_gpu"] if base else None})
    return rows


def goal_lines(rows: list[dict], seq_len: int) -> list[str]:
    def verdict(value, goal):
        return "not measured" if value is None else f"{100 * value:.1f}% ({'met' if value >= goal else 'NOT met'})"

    lines, four = [], [r for r in rows if r["gpus"] == 4 and r["base_gpus"] == 1]
    for row in (r for r in rows if r["arm"].startswith("distill")):
        value = row["mfu"] if seq_len == 8192 else None
        lines.append(f"goal: stage 2 ({row['arm']}) MFU >= 40% at 8K, {row['gpus']} GPU(s): "
                     f"{verdict(value, GOALS['distill_mfu_at_8k'])}")
    for row in four:
        lines.append(f"goal: 1 -> 4 GPU scaling >= 85%, {row['arm']}: "
                     f"{verdict(row['scaling_efficiency'], GOALS['scaling_1_to_4'])}")
    if not four:
        lines.append("goal: 1 -> 4 GPU scaling >= 85%: not measured (needs a 1-GPU and a 4-GPU run)")
    return lines


def report(paths: list[str], out: str | None) -> None:
    runs = sorted((json.loads(Path(p).read_text()) for p in paths), key=lambda r: r["world_size"])
    keys = {(r["shape"], r["layers"], r["seq_len"]) for r in runs}
    if len(keys) > 1:
        sys.exit(f"error: the runs differ in (shape, layers, seq_len): {sorted(keys)}; merge runs of one setting")
    rows = scaling_rows(runs)
    fmt = lambda x, scale=1.0, spec=".1f": "n/a" if x is None else format(scale * x, spec)  # noqa: E731
    print(f"{runs[0]['shape']} x {runs[0]['layers']} layers, {runs[0]['seq_len']} tokens/row, micro-batch 1\n")
    print("| arm | GPUs | s/step | tokens/s/GPU | MFU % | peak GiB/GPU | "
          f"scaling vs {runs[0]['world_size']} GPU(s) % |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['arm']} | {r['gpus']} | {r['step_seconds_median']:.3f} | {r['tokens_per_s_per_gpu']:,.0f} | "
              f"{fmt(r['mfu'], 100)} | {fmt(r['peak_memory_gib'], spec='.2f')} | {fmt(r['scaling_efficiency'], 100)} |")
    goals = goal_lines(rows, runs[0]["seq_len"])
    print("\n" + "\n".join(goals) + f"\n\n{runs[0]['mfu_formula']}")
    write_json(out, {"runs": runs, "rows": rows, "goals": goals})


# --------------------------------------------------------------------------- command line

def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", choices=sorted(SHAPES), default="8b")
    p.add_argument("--layers", type=int, help="decoder layers (default: 8 for 8b and tiny, 64 for 32b)")
    p.add_argument("--seq-len", type=int, default=8192)
    p.add_argument("--steps", type=int, default=10, help="timed optimizer steps per arm")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps per arm (the first pays Triton's JIT)")
    p.add_argument("--arms", default=",".join(ARMS), help=f"comma-separated subset of {','.join(ARMS)}")
    p.add_argument("--align-loss", choices=("layerwise", "pre_lm_head"), default="layerwise")
    p.add_argument("--distill-trainable", choices=("gdn", "gdn+norms", "gdn+norms+attention"), default="gdn")
    p.add_argument("--tile-tokens", type=int, default=1024, help="sequence tile of the logit losses")
    p.add_argument("--peak-tflops", type=float, default=989.0, help="dense bf16 peak per GPU (H100 SXM: 989)")
    p.add_argument("--activation-checkpointing", action="store_true")
    p.add_argument("--offload-optimizer", action="store_true")
    p.add_argument("--label", default="")
    p.add_argument("--json", help="write results here (rank 0, after every arm)")
    p.add_argument("--report", nargs="+", metavar="JSON", help="merge runs at several GPU counts and exit")
    args = p.parse_args(argv)
    args.arms = [a for a in args.arms.split(",") if a]
    bad = [a for a in args.arms if a not in ARMS]
    if bad or not args.arms:
        p.error(f"--arms {bad or 'is empty'}: accepted {', '.join(ARMS)}")
    args.layers = args.layers or DEFAULT_LAYERS[args.shape]
    if args.layers < 2 or args.seq_len < 2 or args.steps < 1 or args.warmup < 0:
        p.error("need --layers >= 2 (one attention and one GDN layer), --seq-len >= 2, --steps >= 1, --warmup >= 0")
    args.label = args.label or f"{args.shape}-{args.layers}L-{args.seq_len}"
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.report:
        report(args.report, args.json)
    else:
        run_benchmark(args)


if __name__ == "__main__":
    main()
