"""Runs the tiny pipeline in each process of a torchrun launch (ZeRO over gloo on CPU).

    torchrun --nproc_per_node 2 -m tests.distributed.driver '<json>'

The JSON holds ``tiny_pipeline_config`` arguments and optionally ``kill_after_step`` (every
rank SIGKILLs itself right after that step's checkpoint; in the stage named ``kill_stage`` alone, if
given) or ``sigterm_at_step`` (rank 0 alone receives SIGTERM during that step, as a preempted job
would). A JSON list of such objects (without kills or signals) runs those pipelines one after another
in the same processes: a launch (interpreter, imports, process group) costs more than a tiny run.
"""

from __future__ import annotations

import json
import os
import signal
import sys

from factory.config.schema import DeepSpeedConfig
from tests.fixtures import tiny_pipeline_config


def kill_after_checkpoint(step: int, stage: str | None) -> None:
    from factory.train import checkpointing as callback

    original = callback.CheckpointCallback.save

    def save_then_die(self, state):
        path = original(self, state)
        if state.step == step and stage in (None, self.stage_dir.name.partition("-")[2]):
            os.kill(os.getpid(), signal.SIGKILL)
        return path

    callback.CheckpointCallback.save = save_then_die


def sigterm_rank0_at(step: int) -> None:
    if os.environ.get("RANK") != "0":
        return
    from factory.train import loop

    original_to_device, calls = loop.to_device, []

    def to_device_and_signal(batch, device):
        calls.append(1)
        if len(calls) == step:
            os.kill(os.getpid(), signal.SIGTERM)
        return original_to_device(batch, device)

    loop.to_device = to_device_and_signal


def run(args: dict) -> None:
    cfg = tiny_pipeline_config(**args)
    cfg.deepspeed = DeepSpeedConfig(enabled=True, zero_stage=3, reduce_bucket_size=10_000,
                                    prefetch_bucket_size=10_000, param_persistence_threshold=0)
    from factory.pipeline import run_pipeline

    run_pipeline(cfg, "")


def main() -> None:
    args = json.loads(sys.argv[1])
    if isinstance(args, list):
        for one in args:
            run(one)
        return
    if (step := args.pop("kill_after_step", None)) is not None:
        kill_after_checkpoint(step, args.pop("kill_stage", None))
    if (step := args.pop("sigterm_at_step", None)) is not None:
        sigterm_rank0_at(step)
    from factory.train.checkpointing import Preempted

    try:
        run(args)
    except Preempted as stop:
        sys.exit(128 + stop.signum)


if __name__ == "__main__":
    main()
