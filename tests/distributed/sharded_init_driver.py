"""Runs stages of the tiny pipeline under ZeRO-3 in each process of a torchrun launch, with a small
safetensors shard size so that the sharded ``init`` writes the tiny hybrid in several files.

    torchrun --nproc_per_node 2 -m tests.distributed.sharded_init_driver '<json>'

The JSON holds ``tiny_pipeline_config`` arguments and ``shard_bytes``.
"""

from __future__ import annotations

import json
import os
import sys

from factory.config.schema import DeepSpeedConfig
from tests.fixtures import tiny_pipeline_config


def main() -> None:
    args = json.loads(sys.argv[1])
    from factory.checkpoint import shards

    shards.DEFAULT_SHARD_BYTES = args.pop("shard_bytes")
    cfg = tiny_pipeline_config(**args)
    # Nothing persistent: every parameter is partitioned, so what a rank holds whole is what it gathered.
    cfg.deepspeed = DeepSpeedConfig(enabled=True, zero_stage=3, reduce_bucket_size=10_000,
                                    prefetch_bucket_size=10_000, param_persistence_threshold=0)
    from deepspeed.runtime.zero import parameter_offload

    from factory.pipeline import run_pipeline

    root = run_pipeline(cfg, "")
    # DeepSpeed keeps each ZeRO-3 engine's model on a module-level stack unless released.
    (root.parent / f"modules_left_rank{os.environ.get('RANK', '0')}.json").write_text(
        json.dumps(len(parameter_offload.FWD_MODULE_STACK)))


if __name__ == "__main__":
    main()
