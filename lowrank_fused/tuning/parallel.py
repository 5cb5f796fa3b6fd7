"""Compiling in parallel, as far as Triton allows.

What Triton 3.6 allows: ``triton.runtime._async_compile.AsyncCompileMode(executor)`` makes a
*compile-only* call (``JITFunction.warmup``, ``Autotuner.warmup``) submit the compile to the
executor and return at once; leaving the mode waits for every compile and installs the
binaries in the kernel's in-process cache. A launching call under the mode still waits for its
own compile, so parallelism needs the compile-only calls first: ``precompile_configs`` issues
one per candidate config of an autotuner key before the (serial) timing, so the ~6 configs of a
key build at once instead of one after another. The pool is threads (Triton's compile closures
do not pickle): the front end (Python AST to TTIR) holds the GIL, the MLIR and LLVM passes
overlap only as far as Triton's bindings release it (not measured here), and ptxas, a
subprocess, overlaps fully. Different keys are met one at a time as the model runs, so
they compile one after another; each key's configs are what overlaps.
"""
from __future__ import annotations

import functools
import os
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Iterable, Optional

WORKERS_ENV = "LOWRANK_FUSED_COMPILE_WORKERS"


def default_workers() -> int:
    """``LOWRANK_FUSED_COMPILE_WORKERS``, else the CPUs this process may use, at most 8."""
    explicit = os.environ.get(WORKERS_ENV)
    if explicit:
        if not explicit.isdigit() or int(explicit) < 1:
            raise ValueError(f"{WORKERS_ENV}: expected a positive integer, got {explicit!r}")
        return int(explicit)
    available = (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
                 else os.cpu_count() or 1)
    return max(1, min(8, available))


def _async_compile_mode():
    try:
        from triton.runtime._async_compile import AsyncCompileMode, active_mode
    except ImportError:  # Triton before 3.4: no asynchronous compiles
        return None, None
    return AsyncCompileMode, active_mode


def precompile(calls: Iterable[Callable[[], object]], workers: Optional[int] = None) -> bool:
    """Run compile-only ``calls`` under AsyncCompileMode with ``workers`` threads and wait for
    their compiles. Failures are ignored (the timing that follows meets them again and scores a
    config that does not compile as infinitely slow). False, having done nothing, where Triton
    has no AsyncCompileMode, one is already active, or there is at most one call or worker."""
    calls = list(calls)
    mode_class, active_mode = _async_compile_mode()
    workers = workers or default_workers()
    if mode_class is None or active_mode.get() is not None or len(calls) < 2 or workers < 2:
        return False
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="lowrank_fused-compile") as pool:
        with mode_class(pool, ignore_errors=True):
            for call in calls:
                try:
                    call()
                except Exception:  # a config that cannot be specialised: the timing says so
                    pass
    return True


def precompile_configs(autotuner, configs, meta: dict, workers: Optional[int] = None) -> bool:
    """Compile ``autotuner``'s kernel for each of ``configs`` with the pending launch's
    arguments (``autotuner.nargs``, set by Autotuner.run) and meta-parameters, in parallel."""
    nargs = getattr(autotuner, "nargs", None)
    if not nargs:
        return False
    warmup = autotuner.fn.warmup
    # the launch's own grid and warmup flag ride in its meta-parameters: a compile-only call
    # sets both itself
    meta = {name: value for name, value in meta.items() if name not in ("grid", "warmup")}
    return precompile([functools.partial(warmup, **nargs, **meta, **config.all_kwargs(),
                                         grid=(1,))
                       for config in configs], workers)
