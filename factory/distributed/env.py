"""Process-group set-up from torchrun or SLURM environment variables."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistEnv:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier()

    def any_rank(self, flag: bool) -> bool:
        if self.world_size == 1:
            return flag
        t = torch.tensor([int(flag)])
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item())


def _from_slurm() -> None:
    """srun starts one task per GPU: map SLURM's ids onto torchrun's variables."""
    if "RANK" in os.environ or int(os.environ.get("SLURM_NTASKS", "1")) <= 1:
        return
    os.environ["RANK"] = os.environ["SLURM_PROCID"]
    os.environ["WORLD_SIZE"] = os.environ["SLURM_NTASKS"]
    os.environ["LOCAL_RANK"] = os.environ["SLURM_LOCALID"]
    os.environ.setdefault("MASTER_PORT", "29500")
    if "MASTER_ADDR" not in os.environ:
        raise RuntimeError("SLURM launch without MASTER_ADDR: use launch/slurm.sbatch, which sets it")


def current_env() -> DistEnv:
    _from_slurm()
    return DistEnv(int(os.environ.get("RANK", 0)), int(os.environ.get("LOCAL_RANK", 0)),
                   int(os.environ.get("WORLD_SIZE", 1)))


def init_distributed() -> DistEnv:
    """Join the process group (gloo on CPU, NCCL on GPU) when launched with several processes."""
    env = current_env()
    if env.world_size > 1 and not dist.is_initialized():
        import deepspeed

        if torch.cuda.is_available():
            torch.cuda.set_device(env.local_rank)
        deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo")
    return env
