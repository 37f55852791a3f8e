"""Training checkpoints: atomic, verifiable, resumable.

Layout inside a stage directory::

    checkpoints/checkpoint-<step>/   engine state (model, optimizer, scheduler), trainer.json,
                                     rng.pt, and COMPLETE written last
    checkpoints/latest               the newest complete tag, replaced atomically after COMPLETE

A checkpoint is written into a temporary directory and renamed into place, so it is complete
or absent. On resume the newest checkpoint that verifies is used; a damaged one is reported
and skipped.
"""

from __future__ import annotations

import json
import logging
import random
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from factory.rundir import atomic_write_text

log = logging.getLogger(__name__)

COMPLETE = "COMPLETE"
TRAINER_STATE = "trainer.json"
RNG_STATE = "rng-rank{rank}.pt"  # every rank has its own streams


class ResumeRefused(RuntimeError):
    """A checkpoint exists but was made by another config."""


@dataclass
class TrainerState:
    step: int
    tokens: int
    elapsed: float
    loader: dict
    config_hash: str
    world_size: int = 1
    extra: dict = field(default_factory=dict)


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def checkpoint_root(stage_dir: Path) -> Path:
    return Path(stage_dir) / "checkpoints"


def tag_for(step: int) -> str:
    return f"checkpoint-{step:08d}"


def _verify(path: Path) -> str | None:
    """None when the checkpoint is usable, else why not."""
    if not (path / COMPLETE).exists():
        return "no COMPLETE marker (interrupted while writing)"
    expected = json.loads((path / COMPLETE).read_text())
    for name, size in expected.items():
        f = path / name
        if not f.exists() or f.stat().st_size != size:
            return f"file {name} is missing or truncated"
    return None


def _file_sizes(path: Path) -> dict[str, int]:
    return {str(f.relative_to(path)): f.stat().st_size for f in sorted(path.rglob("*")) if f.is_file()}


def save_checkpoint(stage_dir: Path, engine, trainer: TrainerState, keep_last: int, rank: int = 0,
                    barrier=lambda: None) -> Path:
    """All ranks call this; rank 0 writes the trainer state and, last, COMPLETE and ``latest``."""
    is_main = rank == 0
    root = checkpoint_root(stage_dir)
    final = root / tag_for(trainer.step)
    tmp = root / f".tmp-{tag_for(trainer.step)}"
    if is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    barrier()
    engine.save(tmp)
    torch.save(rng_state(), tmp / RNG_STATE.format(rank=rank))
    barrier()
    if is_main:
        (tmp / TRAINER_STATE).write_text(json.dumps(asdict(trainer), indent=2))
        (tmp / COMPLETE).write_text(json.dumps(_file_sizes(tmp)))
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        atomic_write_text(root / "latest", final.name + "\n")
        _prune(root, keep_last)
    barrier()
    return final


def _prune(root: Path, keep_last: int) -> None:
    tags = sorted(p for p in root.glob("checkpoint-*") if p.is_dir())
    for old in tags[:-keep_last] if keep_last > 0 else []:
        shutil.rmtree(old, ignore_errors=True)


def find_resumable(stage_dir: Path) -> Path | None:
    """The newest checkpoint that verifies, newest first; damaged ones are reported and skipped."""
    root = checkpoint_root(stage_dir)
    if not root.exists():
        return None
    for path in sorted((p for p in root.glob("checkpoint-*") if p.is_dir()), reverse=True):
        problem = _verify(path)
        if problem is None:
            return path
        log.warning("skipping damaged checkpoint %s: %s", path, problem)
        print(f"warning: skipping damaged checkpoint {path.name}: {problem}")
    return None


def load_trainer_state(path: Path) -> TrainerState:
    return TrainerState(**json.loads((Path(path) / TRAINER_STATE).read_text()))


def restore_rng(path: Path, rank: int = 0) -> None:
    """Each rank's own streams; a rank new to this checkpoint (elastic resume) reseeds from rank 0's."""
    own = Path(path) / RNG_STATE.format(rank=rank)
    set_rng_state(torch.load(own if own.exists() else Path(path) / RNG_STATE.format(rank=0), weights_only=False))
