"""The optimizer seam. The loop runs each micro-batch's loss inside ``micro_batch()``, then calls
``backward`` and ``step``, and never touches the optimizer itself, so a DeepSpeed engine can stand in
for ``LocalEngine`` without loop changes."""

from __future__ import annotations

import contextlib

import torch

from factory.config.schema import OptimConfig
from factory.optim import adamw, lr_multiplier


class LocalEngine:
    """Single-process AdamW with warmup/cosine, gradient clipping and bf16 autocast on CUDA."""

    def __init__(self, model, named_params, cfg: OptimConfig, total_steps: int, precision: str):
        self.model, self.cfg = model, cfg
        self.params = [p for _, p in named_params]
        self.optimizer = adamw(named_params, cfg)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda step: lr_multiplier(step, total_steps, cfg))
        self.precision = precision

    def micro_batch(self):
        """One micro-batch's forward: bf16 autocast on CUDA."""
        device = next(self.model.parameters()).device
        if self.precision == "bf16" and device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def step(self) -> float:
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params, self.cfg.grad_clip or float("inf"))
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(grad_norm)

    @property
    def lr(self) -> float:
        return self.scheduler.get_last_lr()[0]

    def state_dict(self) -> dict:
        return {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])

    def save(self, path) -> None:
        torch.save({"model": self.model.state_dict(), **self.state_dict()}, f"{path}/engine.pt")

    def load(self, path) -> None:
        state = torch.load(f"{path}/engine.pt", weights_only=False)
        self.model.load_state_dict(state.pop("model"))
        self.load_state_dict(state)

    def close(self) -> None:
        pass

    @staticmethod
    def any_rank(flag: bool) -> bool:
        return flag

    def barrier(self) -> None:
        pass

    is_main = True
    world_size = 1

