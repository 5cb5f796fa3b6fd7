"""Remembering the kernels' own choices: an autotuner's launch config and the GEMM variant
(tiled or TMA), through the tuning cache and the shipped table (``Tuner.kernel_choice``).

The kernels do not import this package (data flows one way): they call a hook the Triton
backend installs, and these functions are what it installs.

- ``restore_or_tune(autotuner, tuning_key, configs, bench_fn)`` is a body for Triton's
  ``Autotuner.check_disk_cache`` hook (3.2 and later), which ``Autotuner.run`` calls for a key
  not tuned in this process when ``autotuner.cache_results`` is true. It answers from the
  tuning cache instead of Triton's own autotune files (which Triton loads with ``Config(**json)``
  and no check, so a damaged file raises inside a call); on a miss it compiles the candidate
  configs in parallel (``parallel.precompile_configs``), times them with ``bench_fn`` (not under
  CUDA graph capture: CaptureError) and records the winner. The kernels' autotuner
  (``triton_kernels/autotuner.py``) calls it through its ``choice_hook``.
- ``remembered_variant(name, dtype, key, time_variants)`` is the GEMM-variant choice, timed by
  ``time_variants`` only when nothing is recorded (``triton_kernels/variants.py``'s
  ``variant_hook``).

A second process at the same keys restores both without timing; the one config it then
launches, Triton loads from its own disk cache of compiled kernels.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch

from .choice import Tuner, kernel_entry_id
from .guard import check_not_capturing

VARIANTS = ("tiled", "tma")


def config_json(config) -> dict:
    """A triton.Config as plain JSON data (what is stored and compared)."""
    return {"kwargs": {k: config.kwargs[k] for k in sorted(config.kwargs)},
            "num_warps": config.num_warps, "num_stages": config.num_stages,
            "num_ctas": getattr(config, "num_ctas", 1), "maxnreg": getattr(config, "maxnreg", None)}


def _median_ms(timing) -> Optional[float]:
    """Triton's per-config timing ([median, p20, p80] ms, or a float; inf for a config that
    failed) as one finite number, or None."""
    value = timing[0] if isinstance(timing, (list, tuple)) else timing
    try:
        value = float(value)
    except (TypeError, ValueError):
        return None
    return value if value == value and value != float("inf") else None


def _current_cuda_device() -> Optional[torch.device]:
    """Kernels launch on the current CUDA device: its cache file (None off a GPU)."""
    if torch.cuda.is_initialized():
        return torch.device("cuda", torch.cuda.current_device())
    return None


def _process_tuner(tuner: Optional[Tuner]) -> Tuner:
    if tuner is not None:
        return tuner
    from . import tuner as process_tuner
    return process_tuner()


def restore_or_tune(autotuner, tuning_key, configs, bench_fn, *,
                    tuner: Optional[Tuner] = None, workers: Optional[int] = None) -> bool:
    """Triton's ``check_disk_cache(tuning_key, configs, bench_fn)`` for ``autotuner``: sets
    ``autotuner.cache[tuning_key]`` and returns True when the config was restored without
    timing. The launch's meta-parameters, for the parallel precompile, are read from
    ``autotuner.last_meta`` (set it in ``prune_configs``; without it no precompile)."""
    if len(configs) <= 1:
        bench_fn()  # nothing to choose: nothing timed, nothing recorded
        return False
    name = autotuner.base_fn.__name__
    if any(getattr(c, "pre_hook", None) for c in configs):  # a hook cannot be stored
        check_not_capturing(f"the launch config of {name}")
        bench_fn()
        return False
    from . import parallel
    candidates = [config_json(c) for c in configs]
    entry_id = kernel_entry_id("autotune", name, repr(tuple(tuning_key)), candidates)
    measured = []

    def measure():
        meta = getattr(autotuner, "last_meta", None)
        if meta is not None:
            parallel.precompile_configs(autotuner, configs, meta, workers)
        bench_fn()
        measured.append(True)
        timings = getattr(autotuner, "configs_timings", None) or {}
        return (configs.index(autotuner.cache[tuning_key]),
                [_median_ms(timings.get(c)) for c in configs])

    index = _process_tuner(tuner).kernel_choice(entry_id, candidates, measure,
                                                device=_current_cuda_device(),
                                                what=f"the launch config of {name}")
    autotuner.cache[tuning_key] = configs[index]
    return not measured


def remembered_variant(name: str, dtype, key, time_variants: Callable[[], dict], *,
                       tuner: Optional[Tuner] = None) -> str:
    """"tiled" or "tma" for launcher ``name`` at ``key`` over a ``dtype`` base: the recorded
    choice, else the faster of ``time_variants()`` -> {variant: ms, or None if it failed}."""
    entry_id = kernel_entry_id("variant", name, repr((str(dtype), key)), list(VARIANTS))

    def measure():
        times = time_variants()
        timed = {v: t for v, t in times.items() if t is not None and v in VARIANTS}
        if not timed:
            raise RuntimeError(f"no GEMM variant of {name} could be timed")
        return VARIANTS.index(min(timed, key=timed.get)), [times.get(v) for v in VARIANTS]

    index = _process_tuner(tuner).kernel_choice(entry_id, list(VARIANTS), measure,
                                                device=_current_cuda_device(),
                                                what=f"the GEMM variant of {name}")
    return VARIANTS[index]
