"""Loop callbacks: progress bar (a terminal), progress lines (logs), metrics JSONL, wandb, loss-curve plot."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from tqdm.auto import tqdm

from factory.train.loop import StepState


class ProgressBar:
    def __init__(self, stage: str, total_steps: int, start_step: int = 0):
        self.bar = tqdm(total=total_steps, initial=start_step, desc=stage, file=sys.stderr,
                        dynamic_ncols=True, mininterval=1.0, disable=None)
        self.start_tokens, self.start_elapsed = None, None

    def on_step(self, state: StepState) -> None:
        if self.start_tokens is None:
            self.start_tokens, self.start_elapsed = state.tokens, state.elapsed
        rate = (state.tokens - self.start_tokens) / max(1e-9, state.elapsed - self.start_elapsed)
        self.bar.set_postfix(loss=f"{state.loss:.4f}", tok_s=f"{rate:,.0f}", lr=f"{state.lr:.2e}", refresh=False)
        self.bar.update(1)

    def on_end(self, state: StepState) -> None:
        self.bar.close()


def _duration(seconds: float) -> str:
    seconds = int(max(0, seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class ProgressLog:
    """One flushed line every ``every`` steps, for logs (SLURM, a file, a pipe), where a bar is invisible:
    ``[align] step 20/150 loss 0.0123 tokens/s 8,192 ETA 0:01:05``. Rates are the stage's averages
    (tokens and time are restored on resume)."""

    def __init__(self, stage: str, every: int, stream=None):
        self.stage, self.every, self.stream = stage, max(1, every), stream or sys.stdout

    def on_step(self, state: StepState) -> None:
        if state.step % self.every and state.step != state.total_steps:
            return
        seconds = max(1e-9, state.elapsed)
        eta = seconds / max(1, state.step) * (state.total_steps - state.step)
        print(f"[{self.stage}] step {state.step}/{state.total_steps} loss {state.loss:.4f} "
              f"tokens/s {state.tokens / seconds:,.0f} ETA {_duration(eta)}", file=self.stream, flush=True)

    def on_end(self, state: StepState) -> None:
        pass


class MetricsLogger:
    """Appends one JSON line per logged step to ``metrics.jsonl``."""

    def __init__(self, path: Path, every: int):
        self.path, self.every = Path(path), max(1, every)

    def record(self, state: StepState) -> dict:
        return {"step": state.step, "tokens": state.tokens, "loss": state.loss, "lr": state.lr,
                "grad_norm": state.grad_norm, "elapsed_s": round(state.elapsed, 3), **state.metrics}

    def on_step(self, state: StepState) -> None:
        if state.step % self.every == 0 or state.step == state.total_steps:
            with self.path.open("a") as f:
                f.write(json.dumps(self.record(state)) + "\n")

    def on_end(self, state: StepState) -> None:
        pass


class WandbLogger:
    def __init__(self, project: str, mode: str, run_name: str, config: dict, every: int):
        import wandb

        self.wandb, self.every = wandb, max(1, every)
        self.run = wandb.init(project=project, mode=mode, name=run_name, config=config, reinit="finish_previous")

    def on_step(self, state: StepState) -> None:
        if state.step % self.every == 0 or state.step == state.total_steps:
            self.run.log({"loss": state.loss, "lr": state.lr, "grad_norm": state.grad_norm,
                          "tokens": state.tokens, **state.metrics}, step=state.step)

    def on_end(self, state: StepState) -> None:
        self.run.finish()


def truncate_metrics(path: Path, step: int) -> None:
    """On resume, drop records logged after the checkpoint's step (they will be logged again)."""
    if not path.exists():
        return
    lines = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= step]
    path.write_text("".join(line + "\n" for line in lines))


def plot_loss_curve(metrics_path: Path, out_path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = [json.loads(line) for line in Path(metrics_path).read_text().splitlines() if line.strip()]
    if not records:
        return
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot([r["step"] for r in records], [r["loss"] for r in records])
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_yscale("log")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out_path, dpi=100)
    plt.close(fig)


class LossPlot:
    def __init__(self, metrics_path: Path, out_path: Path, title: str):
        self.metrics_path, self.out_path, self.title = metrics_path, out_path, title

    def on_step(self, state: StepState) -> None:
        pass

    def on_end(self, state: StepState) -> None:
        plot_loss_curve(self.metrics_path, self.out_path, self.title)
