"""Median milliseconds of a step, shared by the benchmarks: CUDA events on GPU, wall clock on CPU."""

from __future__ import annotations

import statistics
import time

import torch


def median_ms(step, warmup: int, iters: int, cuda: bool | None = None) -> float:
    cuda = torch.cuda.is_available() if cuda is None else cuda
    for _ in range(warmup):
        step()
    times = []
    for _ in range(iters):
        if cuda:
            torch.cuda.synchronize()  # start from an idle GPU, so the events bracket this step alone
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            step()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            step()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)
