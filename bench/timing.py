"""Median milliseconds of a step, shared by the benchmarks: CUDA events on GPU, wall clock on CPU."""

from __future__ import annotations

import statistics
import time

import torch


def elapsed_ms(step, cuda: bool) -> float:
    """Milliseconds of one call: CUDA events from an idle GPU (so they bracket this step alone), else wall clock."""
    if not cuda:
        t0 = time.perf_counter()
        step()
        return (time.perf_counter() - t0) * 1e3
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    step()
    end.record()
    end.synchronize()
    return start.elapsed_time(end)


def median_ms(step, warmup: int, iters: int, cuda: bool | None = None) -> float:
    cuda = torch.cuda.is_available() if cuda is None else cuda
    for _ in range(warmup):
        step()
    return statistics.median(elapsed_ms(step, cuda) for _ in range(iters))
