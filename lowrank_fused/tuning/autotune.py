"""Persisting the Triton autotuners' choices: ``PersistentAutotuner``, a mixin for a
``triton.runtime.Autotuner`` subclass (the kernels' ``configs._Autotuner``), and the JSON form
of a ``triton.Config``.

Triton's ``Autotuner.run`` (3.2 and later) calls ``self.check_disk_cache(tuning_key,
pruned_configs, bench_fn)`` for a key it has not tuned in this process when
``self.cache_results`` is true. The mixin answers it from the tuning cache and the shipped table
(``Tuner.kernel_choice``) instead of Triton's own autotune files (which it would load with
``Config(**json)`` and no check, so a damaged file raises inside a call). On a miss it compiles
the candidate configs in parallel (``parallel.precompile``), times them with ``bench_fn`` (not
under CUDA graph capture: CaptureError) and records the winner. A second process at the same
key restores the config without timing, and Triton loads its binary from its own disk cache.
"""
from __future__ import annotations

from typing import Optional

import torch

from .choice import kernel_entry_id


def config_json(config) -> dict:
    """A triton.Config as plain JSON data (what is stored and compared)."""
    return {"kwargs": {k: config.kwargs[k] for k in sorted(config.kwargs)},
            "num_warps": config.num_warps, "num_stages": config.num_stages,
            "num_ctas": getattr(config, "num_ctas", 1), "maxnreg": getattr(config, "maxnreg", None)}


def _median_ms(timing) -> Optional[float]:
    """Triton's per-config timing ([median, p20, p80] ms, or a float; inf for a failed
    compile) as one finite number or None."""
    value = timing[0] if isinstance(timing, (list, tuple)) else timing
    try:
        value = float(value)
    except (TypeError, ValueError):
        return None
    return value if value == value and value != float("inf") else None


class PersistentAutotuner:
    """Mixin: put it first among the bases of a triton.runtime.Autotuner subclass and set
    ``self.cache_results = True`` after ``super().__init__``. ``tuner``: the Tuner to use
    (default: the process's, ``lowrank_fused.tuning.tuner()``), for tests."""

    tuner = None
    precompile_workers: Optional[int] = None  # None: parallel.default_workers()

    def prune_configs(self, kwargs):
        self._meta = dict(kwargs)  # the launch's meta-parameters, for precompiling on a miss
        return super().prune_configs(kwargs)

    def _kernel_name(self) -> str:
        return self.base_fn.__name__

    def check_disk_cache(self, tuning_key, configs, bench_fn):
        if len(configs) <= 1 or any(getattr(c, "pre_hook", None) for c in configs):
            bench_fn()  # nothing to choose (or a hook that cannot be stored): no record
            return False
        from . import parallel, tuner as process_tuner
        tuner = self.tuner or process_tuner()
        candidates = [config_json(c) for c in configs]
        entry_id = kernel_entry_id("autotune", self._kernel_name(), repr(tuple(tuning_key)),
                                   candidates)
        # Triton launches on the current CUDA device: that GPU's cache file
        device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_initialized() else None
        measured = []

        def measure():
            parallel.precompile_configs(self, configs, getattr(self, "_meta", {}),
                                        self.precompile_workers)
            bench_fn()
            measured.append(True)
            best = self.cache[tuning_key]
            timings = getattr(self, "configs_timings", {}) or {}
            return configs.index(best), [_median_ms(timings.get(c)) for c in configs]

        index = tuner.kernel_choice(entry_id, candidates, measure, device=device,
                                    what=f"the launch config of {self._kernel_name()}")
        self.cache[tuning_key] = configs[index]
        return not measured  # True: restored without timing
