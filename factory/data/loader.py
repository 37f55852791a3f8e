"""Deterministic, resumable batches of packed rows.

The order is a permutation drawn from ``seed + epoch``; the loader's whole state is
``(epoch, index)``, so a resumed run sees exactly the batches it would have seen. Each
data-parallel rank takes its own slice of every global batch.
"""

from __future__ import annotations

import torch

from factory.data.packing import PackedRows


class RowLoader:
    def __init__(self, rows: PackedRows, batch_size: int, seed: int, rank: int = 0, world_size: int = 1):
        global_batch = batch_size * world_size
        if len(rows) < global_batch:
            raise ValueError(f"{len(rows)} packed rows cannot fill one global batch of {global_batch} rows; "
                             "add data or lower batch_size/seq_len")
        self.rows, self.batch_size, self.seed = rows, batch_size, seed
        self.rank, self.world_size = rank, world_size
        self.epoch, self.index = 0, 0
        self._order = self._permutation()

    def _permutation(self) -> torch.Tensor:
        return torch.randperm(len(self.rows), generator=torch.Generator().manual_seed(self.seed + self.epoch))

    @property
    def batches_per_epoch(self) -> int:
        return len(self.rows) // (self.batch_size * self.world_size)

    def next_batch(self) -> dict[str, torch.Tensor]:
        if self.index >= self.batches_per_epoch:
            self.epoch, self.index = self.epoch + 1, 0
            self._order = self._permutation()
        start = (self.index * self.world_size + self.rank) * self.batch_size
        self.index += 1
        return self.rows.batch(self._order[start:start + self.batch_size])

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "index": self.index, "seed": self.seed}

    def load_state_dict(self, state: dict) -> None:
        self.seed, self.epoch, self.index = state["seed"], state["epoch"], state["index"]
        self._order = self._permutation()
