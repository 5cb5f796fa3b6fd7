"""The one timer of every figure: tools.first, tools.probe and the benchmark suites.

On a GPU, ``triton.testing.do_bench``'s method: CUDA events around each call, the L2 cache
flushed before each call (outside the events), warm-up calls first (compilation and autotuning
stay out), then as many rounds as fill about ``target_ms`` per contender. In each round every
contender runs once, the order rotated from round to round (round-robin: a clock or thermal
drift hits all contenders alike), and each contender's ``before`` (e.g. gradients set to None,
so no repeat adds into a kept .grad) runs outside the timed region. Each contender gets
p20 / p50 / p80 of its samples. On a CPU (dry runs, CI) the same loop runs on the wall clock,
with few rounds: it checks the code path, not speed.
"""
from __future__ import annotations

import math
import statistics
import time
from dataclasses import dataclass
from typing import Callable, Optional, Union

import torch

L2_FLUSH_BYTES = 256 << 20  # what do_bench writes: several times any GPU's L2
_flush_buffers = {}


@dataclass(frozen=True)
class Spread:
    """Milliseconds: the 20th, 50th and 80th percentile of ``samples`` timings."""
    p20: float
    p50: float
    p80: float
    samples: int

    def row(self) -> dict:
        return {"p20_ms": round(self.p20, 4), "p50_ms": round(self.p50, 4),
                "p80_ms": round(self.p80, 4), "samples": self.samples}


@dataclass
class Timed:
    """A callable to time, and what to run before each call outside the timed region."""
    fn: Callable[[], object]
    before: Optional[Callable[[], None]] = None


class ContenderError(RuntimeError):
    """A contender raised while being timed; ``contender`` names it, ``__cause__`` is the error."""

    def __init__(self, contender: str, error: BaseException):
        super().__init__(f"{contender}: {type(error).__name__}: {error}")
        self.contender = contender


def spread(samples_ms) -> Spread:
    """p20 / p50 / p80 of a list of milliseconds (linear interpolation between samples)."""
    values = sorted(samples_ms)
    if not values:
        raise ValueError("spread of no samples")
    if len(values) == 1:
        return Spread(values[0], values[0], values[0], 1)
    cuts = statistics.quantiles(values, n=10, method="inclusive")
    return Spread(cuts[1], statistics.median(values), cuts[7], len(values))


def grads_to_none(*owners) -> Callable[[], None]:
    """A ``before`` that sets .grad to None on each tensor, and on each module's parameters."""
    def clear():
        for owner in owners:
            if isinstance(owner, torch.Tensor):
                owner.grad = None
            else:
                for param in owner.parameters():
                    param.grad = None
    return clear


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def first_call_ms(fn: Callable[[], object], device: torch.device) -> float:
    """Wall-clock milliseconds of one call, device synchronised on both sides: the cold first
    call (compilation, autotuning, verification included) when nothing ran before."""
    synchronize(device)
    start = time.perf_counter()
    fn()
    synchronize(device)
    return (time.perf_counter() - start) * 1e3


def _flush(device: torch.device) -> None:
    if device.type != "cuda":
        return
    if device not in _flush_buffers:
        _flush_buffers[device] = torch.empty(L2_FLUSH_BYTES, dtype=torch.int8, device=device)
    _flush_buffers[device].zero_()


def _as_timed(c: Union[Callable, Timed]) -> Timed:
    return c if isinstance(c, Timed) else Timed(c)


def _guarded(name: str, fn: Callable[[], object]):
    try:
        return fn()
    except Exception as exc:  # noqa: BLE001  (the caller decides: drop it or end the step)
        raise ContenderError(name, exc) from exc


def interleaved(contenders: dict, device: torch.device, *, rounds: Optional[int] = None,
                warmup_ms: float = 25.0, target_ms: float = 100.0, min_rounds: int = 10,
                max_rounds: int = 200, cpu_rounds: int = 3, cpu_warmup_rounds: int = 1) -> dict:
    """{name: Spread} of each contender (a callable or a ``Timed``), timed round-robin.

    GPU: warm-up rounds until ``warmup_ms`` have passed (at least two), then ``rounds`` rounds
    (default: enough for about ``target_ms`` per contender, within [min_rounds, max_rounds]).
    CPU: ``cpu_warmup_rounds``, then ``rounds`` (default ``cpu_rounds``) on the wall clock. A
    contender that raises ends the timing with a ``ContenderError`` naming it."""
    items = [(name, _as_timed(c)) for name, c in contenders.items()]
    if not items:
        return {}
    on_gpu = device.type == "cuda"
    # warm-up: whole rounds, so every contender is as warm as the others
    synchronize(device)
    start, warm_rounds, elapsed = time.perf_counter(), 0, 0.0
    while on_gpu or warm_rounds < cpu_warmup_rounds:
        for name, timed in items:
            if timed.before is not None:
                _guarded(name, timed.before)
            _guarded(name, timed.fn)
        synchronize(device)
        warm_rounds += 1
        elapsed = (time.perf_counter() - start) * 1e3
        if on_gpu and warm_rounds >= 2 and elapsed >= warmup_ms:
            break
    round_ms = elapsed / max(warm_rounds, 1)
    if rounds is None:
        if on_gpu:
            wanted = math.ceil(target_ms * len(items) / max(round_ms, 1e-3))
            rounds = max(min_rounds, min(max_rounds, wanted))
        else:
            rounds = cpu_rounds
    samples = {name: [] for name, _ in items}
    events = []
    for i in range(rounds):
        for j in range(len(items)):
            name, timed = items[(i + j) % len(items)]  # rotated order
            if timed.before is not None:
                _guarded(name, timed.before)
            if on_gpu:
                _flush(device)
                begin, end = (torch.cuda.Event(enable_timing=True),
                              torch.cuda.Event(enable_timing=True))
                begin.record()
                _guarded(name, timed.fn)
                end.record()
                events.append((name, begin, end))
            else:
                t0 = time.perf_counter()
                _guarded(name, timed.fn)
                samples[name].append((time.perf_counter() - t0) * 1e3)
    if on_gpu:
        torch.cuda.synchronize(device)
        for name, begin, end in events:
            samples[name].append(begin.elapsed_time(end))
    return {name: spread(values) for name, values in samples.items()}
