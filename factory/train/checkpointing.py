"""Checkpoint callback: every N steps, every M minutes, and when SIGTERM/SIGUSR1 arrive
(SLURM preemption), after which the run stops with ``Preempted``."""

from __future__ import annotations

import signal
import time
from pathlib import Path

from factory.checkpoint.state import TrainerState, save_checkpoint
from factory.config.schema import CheckpointConfig
from factory.train.loop import StepState

PREEMPT_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class Preempted(Exception):
    """Raised after the preemption checkpoint is written."""

    def __init__(self, signum: int, step: int):
        super().__init__(f"stopped by signal {signal.Signals(signum).name} after saving step {step}")
        self.signum, self.step = signum, step


class CheckpointCallback:
    def __init__(self, stage_dir: Path, engine, loader, cfg: CheckpointConfig, config_hash: str, rank: int = 0):
        self.stage_dir, self.engine, self.loader, self.cfg, self.rank = stage_dir, engine, loader, cfg, rank
        self.config_hash = config_hash
        self.requested: int | None = None
        self.last_save = time.monotonic()
        self.previous = {s: signal.signal(s, self._on_signal) for s in PREEMPT_SIGNALS}

    def _on_signal(self, signum, frame) -> None:
        self.requested = signum  # acted on at the end of the current step

    def _due(self, state: StepState) -> bool:
        by_steps = self.cfg.every_steps and state.step % self.cfg.every_steps == 0
        by_time = self.cfg.every_minutes and time.monotonic() - self.last_save >= 60 * self.cfg.every_minutes
        return bool(by_steps or by_time)

    def save(self, state: StepState) -> Path:
        trainer = TrainerState(step=state.step, tokens=state.tokens, elapsed=state.elapsed,
                               loader=self.loader.state_dict(), config_hash=self.config_hash,
                               world_size=self.engine.world_size)
        path = save_checkpoint(self.stage_dir, self.engine, trainer, self.cfg.keep_last,
                               rank=self.rank, barrier=self.engine.barrier)
        self.last_save = time.monotonic()
        return path

    def on_step(self, state: StepState) -> None:
        stop = self.engine.any_rank(self.requested is not None)
        if state.step < state.total_steps and (stop or self.engine.any_rank(self._due(state))):
            self.save(state)
        if stop:
            self.restore_handlers()
            raise Preempted(self.requested or signal.SIGTERM, state.step)

    def on_end(self, state: StepState) -> None:
        self.restore_handlers()

    def restore_handlers(self) -> None:
        for s, handler in self.previous.items():
            signal.signal(s, handler)
