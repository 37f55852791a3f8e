"""Checkpoint callback: every N steps, every M minutes, and when SIGTERM/SIGUSR1 (SLURM
preemption) or SIGINT (Ctrl-C) arrive, after which the run stops with ``Preempted``. A second
Ctrl-C before the step ends stops at once, without a checkpoint."""

from __future__ import annotations

import signal
import time
from pathlib import Path

from factory.checkpoint.state import TrainerState, save_checkpoint
from factory.config.schema import CheckpointConfig
from factory.train.loop import StepState

PREEMPT_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)


class Preempted(Exception):
    """Raised after the preemption checkpoint is written."""

    def __init__(self, signum: int, step: int, where: str = ""):
        super().__init__(f"stopped by signal {signal.Signals(signum).name} after saving {where or f'step {step}'}; "
                         "rerun the same command to resume")
        self.signum, self.step = signum, step


class CheckpointCallback:
    def __init__(self, stage_dir: Path, engine, loader, cfg: CheckpointConfig, config_hash: str, rank: int = 0):
        self.stage_dir, self.engine, self.loader, self.cfg, self.rank = stage_dir, engine, loader, cfg, rank
        self.config_hash = config_hash
        self.requested: int | None = None
        self.last_save = time.monotonic()
        self.previous = {s: signal.signal(s, self._on_signal) for s in PREEMPT_SIGNALS}

    def _on_signal(self, signum, frame) -> None:
        if signum == signal.SIGINT and self.requested == signal.SIGINT:
            self.restore_handlers()
            raise KeyboardInterrupt  # asked twice: stop now
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
        # On a stop the last step is saved too: the rerun then only writes the stage's model.
        if stop:
            saved = self.save(state)
            self.restore_handlers()
            where = f"{self.stage_dir.name}/{saved.name} (step {state.step} of {state.total_steps})"
            raise Preempted(self.requested or signal.SIGTERM, state.step, where)
        if state.step < state.total_steps and self.engine.any_rank(self._due(state)):
            self.save(state)

    def on_end(self, state: StepState) -> None:
        self.restore_handlers()

    def restore_handlers(self) -> None:
        for s, handler in self.previous.items():
            signal.signal(s, handler)
