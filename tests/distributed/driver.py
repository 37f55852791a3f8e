"""Runs the tiny pipeline in each process of a torchrun launch (ZeRO over gloo on CPU).

    torchrun --nproc_per_node 2 -m tests.distributed.driver '<json>'

The JSON holds ``tiny_pipeline_config`` arguments and optionally ``kill_after_step`` (every
rank SIGKILLs itself right after that step's checkpoint; in the stage named ``kill_stage`` alone, if
given) or ``sigterm_at_step`` (rank 0 alone
receives SIGTERM during that step, as a preempted job would).
"""

from __future__ import annotations

import json
import os
import signal
import sys

from factory.config.schema import DeepSpeedConfig
from tests.fixtures import tiny_pipeline_config


def main() -> None:
    args = json.loads(sys.argv[1])
    kill_after = args.pop("kill_after_step", None)
    kill_stage = args.pop("kill_stage", None)
    if kill_after is not None:
        from factory.train import checkpointing as callback

        original = callback.CheckpointCallback.save

        def save_then_die(self, state):
            path = original(self, state)
            if state.step == kill_after and kill_stage in (None, self.stage_dir.name.partition("-")[2]):
                os.kill(os.getpid(), signal.SIGKILL)
            return path

        callback.CheckpointCallback.save = save_then_die
    sigterm_at = args.pop("sigterm_at_step", None)
    if sigterm_at is not None and os.environ.get("RANK") == "0":
        from factory.train import loop

        original_to_device, calls = loop.to_device, []

        def to_device_and_signal(batch, device):
            calls.append(1)
            if len(calls) == sigterm_at:
                os.kill(os.getpid(), signal.SIGTERM)
            return original_to_device(batch, device)

        loop.to_device = to_device_and_signal
    cfg = tiny_pipeline_config(**args)
    cfg.deepspeed = DeepSpeedConfig(enabled=True, zero_stage=3, reduce_bucket_size=10_000,
                                    prefetch_bucket_size=10_000, param_persistence_threshold=0)
    from factory.train.checkpointing import Preempted
    from factory.pipeline import run_pipeline

    try:
        run_pipeline(cfg, "")
    except Preempted as stop:
        sys.exit(128 + stop.signum)


if __name__ == "__main__":
    main()
