"""Which backend "auto" runs, per key, timed once and remembered (issue 30).

For each ``TuningKey`` the fused backends and the reference composition (cuBLAS with the same
memory saving) are timed once and the fastest kept, so "auto" is never slower than the unfused
path. Decisions persist in a local cache (``store``), or come from a shipped table of measured
GPUs (``shipped``); every decision is listed by ``tuning_report()``; ``warmup(model, batch)``
makes them all before training. Modules, one job each: ``key`` (what a choice is for),
``environment`` (what it is valid for), ``schema`` (the files' JSON and its checks), ``store``
(the local cache), ``shipped`` (the packaged table), ``timing`` (timers), ``guard`` (no timing
under tracing or graph capture), ``choice`` (the Tuner), ``autotune`` (persisting the kernels'
autotuner configs), ``parallel`` (compiling in parallel), ``cold_start`` (``warmup``).

The entry points the dispatcher needs: ``TuningKey.of(...)``, ``tuner().decided(key)`` and
``decide(key, contenders, device=..., default=..., untimed=...)``; the Triton backend installs
``autotune.restore_or_tune`` and ``autotune.remembered_variant`` as the kernels' hooks.
"""
from __future__ import annotations

import threading
from typing import Optional

from .choice import SOURCES, Decision, Tuner, kernel_entry_id
from .key import TuningKey
from .store import TuningCacheWarning, cache_dir
from .cold_start import warmup

_lock = threading.Lock()
_tuner: Optional[Tuner] = None


def tuner() -> Tuner:
    """The process's Tuner (created on first use from the environment variables)."""
    global _tuner
    with _lock:
        if _tuner is None:
            _tuner = Tuner()
        return _tuner


def configure(**options) -> Tuner:
    """Replace the process's Tuner by ``Tuner(**options)`` (tests, tools); its decisions so far
    are forgotten (the cache files stay)."""
    global _tuner
    with _lock:
        _tuner = Tuner(**options)
        return _tuner


def decide(key: TuningKey, contenders, **options) -> str:
    """``tuner().decide(key, contenders, **options)``: the backend to run ``key`` with."""
    return tuner().decide(key, contenders, **options)


def kernel_choice(entry_id: str, candidates, measure, **options) -> int:
    """``tuner().kernel_choice(...)``: a remembered kernel-level choice (config, variant)."""
    return tuner().kernel_choice(entry_id, candidates, measure, **options)


def tuning_report() -> list:
    """What "auto" chose in this process: one dict per key decided, in the order decided, with
    ``key`` (its id), ``description``, ``device``, ``contenders``, ``times_ms`` (per contender,
    None for one that failed; empty when nothing was timed), ``winner``, ``source`` ("timed
    now", "local cache", "shipped table", "only contender", "default (untimed)") and ``note``
    (why untimed)."""
    return tuner().report()


def __getattr__(name):  # what touches Triton is imported when asked for
    if name == "CaptureError":
        from .guard import capture_error
        return capture_error()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["TuningKey", "Tuner", "Decision", "SOURCES", "CaptureError", "TuningCacheWarning",
           "cache_dir", "configure", "decide", "kernel_choice", "kernel_entry_id", "tuner",
           "tuning_report", "warmup"]
