"""How a contender is timed: a ``Timer`` is any callable taking a zero-argument function and
returning the seconds one call takes. Tests inject their own (``ClockTimer`` over a fake clock);
``default_timer`` is what runs on a real device."""
from __future__ import annotations

import statistics
import time
from typing import Callable

import torch

Timer = Callable[[Callable[[], object]], float]


class ClockTimer:
    """The median over ``reps`` calls of ``clock()`` differences (seconds), after nothing: the
    caller has already run the function once (compile, autotune) outside the timing. With a
    fake clock that the contenders advance, timings are whatever the test says."""

    def __init__(self, clock: Callable[[], float] = time.perf_counter, reps: int = 5):
        if reps < 1:
            raise ValueError(f"reps must be >= 1, got {reps}")
        self.clock = clock
        self.reps = reps

    def __call__(self, fn: Callable[[], object]) -> float:
        samples = []
        for _ in range(self.reps):
            start = self.clock()
            fn()
            samples.append(self.clock() - start)
        return statistics.median(samples)


def cuda_timer(fn: Callable[[], object]) -> float:
    """Seconds per call on the current CUDA stream: Triton's do_bench (median, L2 flushed between
    calls) where Triton is installed, else CUDA events over 20 calls."""
    try:
        from triton.testing import do_bench
    except ImportError:
        do_bench = None
    if do_bench is not None:
        return do_bench(fn, warmup=5, rep=25, return_mode="median") / 1e3
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(20):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / 20 / 1e3


def default_timer(device: torch.device) -> Timer:
    """cuda_timer for a CUDA device, a wall-clock ClockTimer otherwise."""
    return cuda_timer if torch.device(device).type == "cuda" else ClockTimer()
