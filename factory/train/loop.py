"""The training loop: batches in, optimizer steps out. Everything else is a callback."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Protocol

import torch


@dataclass
class StepState:
    step: int = 0
    total_steps: int = 0
    tokens: int = 0
    loss: float = float("nan")
    lr: float = 0.0
    grad_norm: float = 0.0
    elapsed: float = 0.0
    metrics: dict = field(default_factory=dict)


class Callback(Protocol):
    def on_step(self, state: StepState) -> None: ...

    def on_end(self, state: StepState) -> None: ...


LossFn = Callable[[dict], tuple[torch.Tensor, dict]]


def to_device(batch: dict, device) -> dict:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def train_loop(engine, loader, loss_fn: LossFn, total_steps: int, grad_accum: int,
               callbacks: list, device, state: StepState | None = None, data_parallel_size: int = 1) -> StepState:
    """Runs from ``state.step`` to ``total_steps``; returns the final state. Tokens are counted
    over the ``data_parallel_size`` replicas that read distinct rows."""
    state = state or StepState(total_steps=total_steps)
    start = time.perf_counter() - state.elapsed
    while state.step < total_steps:
        loss_sum, metric_sums = 0.0, {}
        for _ in range(grad_accum):
            batch = to_device(loader.next_batch(), device)
            with engine.micro_batch():
                loss, metrics = loss_fn(batch)
            engine.backward(loss / grad_accum)
            loss_sum += float(loss.detach()) / grad_accum
            for key, value in metrics.items():
                metric_sums[key] = metric_sums.get(key, 0.0) + float(value) / grad_accum
            state.tokens += batch["input_ids"].numel() * data_parallel_size
        lr = engine.lr
        state.grad_norm = engine.step()
        state.step, state.loss, state.lr, state.metrics = state.step + 1, loss_sum, lr, metric_sums
        state.elapsed = time.perf_counter() - start
        for callback in callbacks:
            callback.on_step(state)
    for callback in callbacks:
        callback.on_end(state)
    return state
