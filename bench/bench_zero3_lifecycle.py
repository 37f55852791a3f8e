"""A partitioned model's life under ZeRO-3 at scale (issue 7, besides throughput): sharded init,
sharded load, checkpoint save, and resume from the checkpoint.

One launch, every rank, the project's own code paths; random teacher weights of the chosen shape:

  init     teacher built sharded (``zero.Init``), hybrid (50% GDN, alternate layers, teacher attention
           kept) built sharded, ``init_sharded`` fills the hybrid layer by layer and rank 0 writes it
           as sharded safetensors (the init stage under ZeRO-3)
  load     that checkpoint loaded back sharded (``zero3_loading`` + ``from_pretrained``: how every
           training stage loads its parent's model)
  train    ``--steps`` align steps (only GDN trainable, layerwise loss) through ``DeepSpeedTrainEngine``
  save     the engine checkpoint the pipeline writes (``DeepSpeedTrainEngine.save``), then one more step
  resume   a fresh load and engine, ``DeepSpeedTrainEngine.load`` of that checkpoint, the same step
           again: its loss against the uninterrupted one

Each phase records seconds (slowest rank, device synchronized), peak GPU memory per rank, and for
init and save the bytes written. Files go to ``--scratch`` (local disk: a 32B hybrid is ~70 GB
and the align checkpoint ~40 GB) and are deleted at the end unless ``--keep``.

    torchrun --nproc_per_node 4 bench/bench_zero3_lifecycle.py --shape 32b --json $OUT/life.json
    DS_ACCELERATOR=cpu OMP_NUM_THREADS=1 torchrun --nproc_per_node 2 bench/bench_zero3_lifecycle.py \\
        --shape tiny --seq-len 128 --steps 2 --json /tmp/life.json
"""

from __future__ import annotations

import argparse
import gc
import json
import shutil
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_zero3_throughput import (  # noqa: E402
    DEFAULT_LAYERS,
    SHAPES,
    FixedRow,
    build,
    gather,
    model_config,
    setup_run,
    versions,
)

_T0 = time.perf_counter()


class Phase:
    """Times a block on every rank (barrier and device sync on both sides) and records its peak memory."""

    def __init__(self, run, results: dict, name: str):
        self.run, self.results, self.name = run, results, name

    def __enter__(self):
        device = self.run["device"]
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        self._sync()
        self.start = time.perf_counter()
        return self

    def _sync(self):
        if self.run["device"].type == "cuda":
            torch.cuda.synchronize(self.run["device"])
        self.run["env"].barrier()

    def __exit__(self, *exc):
        if exc[0] is not None:
            return False
        self._sync()
        device = self.run["device"]
        peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
        self.results[self.name] = {"seconds": time.perf_counter() - self.start, "peak_gib": peak}
        return False


def directory_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def load_hybrid(path: Path, run):
    from factory.distributed.engine import zero3_loading
    from factory.models.hqwen3 import HQwen3ForCausalLM

    with zero3_loading(run["ds"], run["precision"]):
        model = HQwen3ForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="sdpa")
    return model.to(run["device"])


def align_engine(model, run, activation_checkpointing: bool):
    from factory.distributed.engine import DeepSpeedTrainEngine
    from factory.distributed.parallelize import parallelize
    from factory.stages.align import align_loss_fn
    from factory.train.trainable import select_trainable

    parallelize(model, activation_checkpointing=activation_checkpointing)

    engine = DeepSpeedTrainEngine(model, select_trainable(model, "gdn"), run["stage"], run["ds"], run["precision"],
                                  run["env"])
    model.train()
    return engine, align_loss_fn(model, "layerwise")


def train(engine, loss_fn, steps: int, state, args, run):
    from factory.train.loop import train_loop

    row = FixedRow(args.seq_len, engine.model.config.vocab_size, run["env"].rank)
    return train_loop(engine, row, loss_fn, steps, 1, [], run["device"], state,
                      data_parallel_size=run["env"].world_size)


def free(engine, model) -> None:
    from factory.distributed.engine import release_modules

    engine.engine.destroy()
    release_modules([model])
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def phase_init(args, run, phases: dict, out: Path) -> dict:
    from functools import partial

    from factory.config.schema import InitConfig
    from factory.distributed.sharded import build_sharded, init_sharded
    from factory.models.hqwen3 import HQwen3ForCausalLM
    from factory.priming.init import init_group

    with Phase(run, phases, "init"):
        teacher = build("teacher", args, run).requires_grad_(False)
        hybrid = build_sharded(HQwen3ForCausalLM, model_config(args, "align"), run["ds"], run["precision"])
        stats = init_sharded(teacher, hybrid, partial(init_group, init=InitConfig(), seed=0), out, run["env"].is_main)
    del teacher, hybrid
    gc.collect()
    return stats


def run_lifecycle(args, run) -> dict:
    env = run["env"]
    scratch = Path(args.scratch)
    if env.is_main:
        shutil.rmtree(scratch, ignore_errors=True)
    env.barrier()
    model_shape = {**SHAPES[args.shape], "num_hidden_layers": args.layers}
    phases, result = {}, {"shape": args.shape, "layers": args.layers, "seq_len": args.seq_len,
                          "world_size": env.world_size, "model": model_shape}
    result["init_stats"] = phase_init(args, run, phases, scratch / "init")
    note_phase(phases, "init", env)
    with Phase(run, phases, "load"):
        model = load_hybrid(scratch / "init", run)
    note_phase(phases, "load", env)
    engine, loss_fn = align_engine(model, run, args.activation_checkpointing)
    with Phase(run, phases, "train"):
        state = train(engine, loss_fn, args.steps, None, args, run)
    with Phase(run, phases, "save"):
        engine.save(scratch / "checkpoint")
    note_phase(phases, "train", env)
    note_phase(phases, "save", env)
    straight = train(engine, loss_fn, args.steps + 1, state, args, run).loss
    free(engine, model)
    with Phase(run, phases, "resume"):
        model = load_hybrid(scratch / "init", run)
        engine, loss_fn = align_engine(model, run, args.activation_checkpointing)
        engine.load(scratch / "checkpoint")
    from factory.train.loop import StepState

    resumed = train(engine, loss_fn, args.steps + 1, StepState(step=args.steps, total_steps=args.steps + 1),
                    args, run).loss
    result.update(phases=phases, loss_after_checkpoint={"straight": straight, "resumed": resumed},
                  params=sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters()))
    free(engine, model)
    if env.is_main:
        result["bytes"] = {name: directory_bytes(scratch / name) for name in ("init", "checkpoint")}
    return result


def note_phase(phases: dict, name: str, env) -> None:
    """Seconds and rank 0's peak memory as each phase ends, so a launch cut short still shows them."""
    peak = phases[name]["peak_gib"]
    note(f"{name}: {phases[name]['seconds']:.1f} s" + ("" if peak is None else f", peak {peak:.2f} GiB on rank 0"), env)


def note(text: str, env=None) -> None:
    if env is None or env.is_main:
        print(f"[{time.perf_counter() - _T0:8.1f} s] {text}", flush=True)


def merge_ranks(result: dict, env) -> dict:
    """Seconds of the slowest rank and every rank's peak memory."""
    everyone = gather(result["phases"], env)
    result["phases"] = {name: {"seconds": max(r[name]["seconds"] for r in everyone),
                               "peak_gib_per_rank": [r[name]["peak_gib"] for r in everyone]}
                        for name in result["phases"]}
    return result


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", choices=sorted(SHAPES), default="32b")
    p.add_argument("--layers", type=int, help="decoder layers (default: the shape's benchmark default)")
    p.add_argument("--seq-len", type=int, default=8192)
    p.add_argument("--steps", type=int, default=2, help="align steps before the checkpoint")
    p.add_argument("--offload-optimizer", action="store_true")
    p.add_argument("--activation-checkpointing", action="store_true", help="checkpoint the align step's GDN branches")
    p.add_argument("--scratch", default="outputs/lifecycle", help="where the init output and checkpoint go")
    p.add_argument("--keep", action="store_true", help="keep the files in --scratch")
    p.add_argument("--json", help="write the results here (rank 0)")
    args = p.parse_args(argv)
    args.layers = args.layers or DEFAULT_LAYERS[args.shape]
    # What setup_run reads besides the above; its stage then has steps + 1 steps (the LR schedule's length).
    args.warmup, args.tile_tokens = 1, 1024
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    run = setup_run(args)
    result = merge_ranks(run_lifecycle(args, run), run["env"])
    if run["env"].is_main:
        result["versions"] = versions()
        for name, phase in result["phases"].items():
            peaks = [p for p in phase["peak_gib_per_rank"] if p is not None]
            note(f"{name}: {phase['seconds']:.1f} s" + (f", peak {max(peaks):.2f} GiB/GPU" if peaks else ""))
        losses = result["loss_after_checkpoint"]
        note(f"loss of the step after the checkpoint: straight {losses['straight']:.6f}, "
             f"resumed {losses['resumed']:.6f}")
        if args.json:
            Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
        if not args.keep:
            shutil.rmtree(args.scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
