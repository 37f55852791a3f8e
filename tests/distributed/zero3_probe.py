"""Trains a tiny hybrid that keeps the teacher attention with distill's shared-teacher loss for a few
steps, once per run of a JSON list, one after another in the same processes, and prints on rank 0 one
line, ``PROBE <json>``: per run, the decoder layers' parameter count and per step the loss, and under
ZeRO-3 the parameters gathered (forward and backward, decoder-layer weights apart, prefetched apart)
and whether ZeRO-3's trace was complete.

    torchrun --nproc_per_node 2 -m tests.distributed.zero3_probe '[{"stream": "per_layer"}]'

Keys of a run: ``stream`` (per_layer | whole), ``teacher`` (shared | separate: a second model, under
ZeRO-3 a forward-only engine, holding the same weights), ``engine`` (deepspeed | local), ``steps``,
``grad_accum``, ``max_reuse_distance``, ``prefetch_bucket_size``, ``checkpointing``.
"""

from __future__ import annotations

import contextlib
import copy
import json
import sys
from collections import Counter

import torch

from factory.config.schema import DeepSpeedConfig, DistillConfig
from factory.data.packing import IGNORE_INDEX

SEQ = 32


class Rows:
    """A fresh random packed batch per call, the same on every run (seeded by rank and call)."""

    def __init__(self, vocab: int, rank: int, batch: int = 2):
        self.vocab, self.rank, self.batch, self.calls = vocab, rank, batch, 0

    def next_batch(self) -> dict:
        g = torch.Generator().manual_seed(1000 * self.rank + self.calls)
        self.calls += 1
        ids = torch.randint(0, self.vocab, (self.batch, SEQ), generator=g)
        labels = torch.roll(ids, -1, 1)
        labels[:, -1] = IGNORE_INDEX
        positions = torch.cat([torch.arange(12), torch.arange(SEQ - 12)]).expand(self.batch, -1).contiguous()
        return {"input_ids": ids, "position_ids": positions, "labels": labels}


class GatherCounter:
    """Counts the parameters ZeRO-3's coordinator all-gathers, by direction, by whether they belong to
    a decoder layer, and whether they were prefetched (not the submodule being fetched)."""

    def __init__(self):
        from deepspeed.runtime.zero.partitioned_param_coordinator import PartitionedParameterCoordinator, iter_params
        from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

        self.layer_params, self.counts, self.current = set(), Counter(), None
        cls = PartitionedParameterCoordinator
        fetch, gather = cls.fetch_sub_module, cls._PartitionedParameterCoordinator__all_gather_params_
        counter = self

        def fetch_sub_module(coordinator, module, forward):
            counter.current = {id(p) for p in iter_params(module, recurse=True)}
            return fetch(coordinator, module, forward)

        def all_gather(coordinator, params, forward, quantize=False):
            for p in params:
                if p.ds_status == ZeroParamStatus.NOT_AVAILABLE:
                    where = "layers" if id(p) in counter.layer_params else "other"
                    counter.counts[f"{'forward' if forward else 'backward'}_{where}"] += p.ds_numel
                    if id(p) not in counter.current:
                        counter.counts["prefetched"] += p.ds_numel
            return gather(coordinator, params, forward, quantize)

        cls.fetch_sub_module = fetch_sub_module
        cls._PartitionedParameterCoordinator__all_gather_params_ = all_gather

    def watch(self, model) -> None:
        self.layer_params, self.counts = {id(p) for p in model.model.layers.parameters()}, Counter()

    def take(self) -> dict:
        counts, self.counts = dict(self.counts), Counter()
        return counts


class Probe:
    """A loop callback recording per-step gathers and the trace state (also of a teacher engine's)."""

    def __init__(self, engine, counter, teacher_engine=None):
        self.engine, self.counter, self.teacher_engine, self.steps = engine, counter, teacher_engine, []

    def on_step(self, state) -> None:
        from factory.distributed.engine import zero3_coordinator

        coordinator = zero3_coordinator(self.engine.engine) if self.counter else None
        step = {"loss": state.loss, "gathered": self.counter.take() if self.counter else {},
                "trace_complete": coordinator.is_complete_trace() if coordinator else None}
        if self.teacher_engine is not None:
            step["teacher_trace_complete"] = zero3_coordinator(self.teacher_engine).is_complete_trace()
        self.steps.append(step)

    def on_end(self, state) -> None:
        pass


def run(args: dict, env, counter: GatherCounter | None) -> dict:
    from factory.distributed.engine import DeepSpeedTrainEngine, _forward_engine, gathered_parameters, release_modules
    from factory.distributed.parallelize import parallelize
    from factory.stages.distill import distill_loss_fn, shared_loss_fn
    from factory.train.engine import LocalEngine
    from factory.train.loop import train_loop
    from factory.train.trainable import select_trainable
    from tests.helpers import tiny_hybrid

    model = tiny_hybrid(seed=11, keep_teacher_attention=True).train()
    # A separate teacher: the same weights running their attention (the shared teacher's numbers).
    teacher = copy.deepcopy(model).eval().requires_grad_(False) if args.get("teacher") == "separate" else None
    if teacher is not None:
        teacher.model.set_mixer_mode("teacher")
    params = select_trainable(model, "gdn")
    cfg = DistillConfig(steps=args.get("steps", 3), batch_size=2, grad_accum=args.get("grad_accum", 1),
                        loss_tile_tokens=16, teacher_stream=args.get("stream", "per_layer"), plot=False)
    parallelize(model, activation_checkpointing=args.get("checkpointing", False))
    if counter is not None:
        ds = DeepSpeedConfig(enabled=True, zero_stage=3, reduce_bucket_size=10_000, param_persistence_threshold=0,
                             prefetch_bucket_size=args.get("prefetch_bucket_size", 10_000),
                             max_reuse_distance=args.get("max_reuse_distance", 1_000_000_000))
        counter.watch(model)
        engine = DeepSpeedTrainEngine(model, params, cfg, ds, "fp32", env)
        ctx = type("Ctx", (), {"gathered": staticmethod(lambda ps: gathered_parameters(ps))})
    else:
        engine = LocalEngine(model, params, cfg.optim, cfg.steps, "fp32")
        ctx = type("Ctx", (), {"gathered": staticmethod(lambda ps: contextlib.nullcontext())})
    teacher_engine = None
    if teacher is None:
        loss_fn = shared_loss_fn(ctx, cfg, model)
    else:
        if counter is not None:  # as the stage's frozen_teacher: the decoder stack starts each ZeRO-3 step
            teacher_engine, hook = _forward_engine(teacher, ds, "fp32", cfg.batch_size, step_module="model")
            teacher = teacher_engine.module
        loss_fn = distill_loss_fn(ctx, cfg, model, teacher)
    probe = Probe(engine, counter, teacher_engine)
    train_loop(engine, Rows(model.config.vocab_size, env.rank), loss_fn, cfg.steps,
               cfg.grad_accum, [probe], torch.device("cpu"), data_parallel_size=env.world_size)
    if teacher_engine is not None:
        if hook is not None:
            hook.remove()
        teacher_engine.destroy()
        release_modules([teacher])
    if counter is not None:
        engine.close()
    return {"steps": probe.steps, "layer_params": sum(p.ds_numel if hasattr(p, "ds_numel") else p.numel()
                                                      for p in model.model.layers.parameters())}


def main() -> None:
    from factory.distributed.env import init_distributed

    runs = json.loads(sys.argv[1])
    env = init_distributed()
    counter = GatherCounter() if any(r.get("engine", "deepspeed") == "deepspeed" for r in runs) else None
    results = [run(r, env, counter if r.get("engine", "deepspeed") == "deepspeed" else None) for r in runs]
    if env.is_main:
        print("PROBE " + json.dumps(results), flush=True)


if __name__ == "__main__":
    main()
