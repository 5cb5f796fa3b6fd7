"""Which kernel runs a main GEMM (fused_linear, grad_input): the tiled kernel (forward.py,
backward.py) or the persistent TMA kernel (persistent.py).

``LOWRANK_FUSED_TRITON_GEMM`` (or a launcher's ``variant=`` argument) asks for one:

- "auto" (default): on a GPU of capability >= 9 whose Triton has tensor descriptors, each
  variant is autotuned over its own configs, then the two winners are timed once per shape key
  (M bucketed to a power of two) and base dtype, and the faster is kept for that key (a variant
  that fails leaves the other). No timing, the tiled kernel, under LOWRANK_FUSED_AUTOTUNE=quick
  or torch.use_deterministic_algorithms(True); elsewhere, the interpreter included, the tiled
  kernel. Under CUDA graph capture a key not timed yet raises capture.CaptureError.
- "tiled": the tiled kernel.
- "tma": the persistent kernel (how the tests run it on the interpreter).

Whatever is asked, a call whose operands TMA cannot describe (``persistent.describable``), whose
operands differ in dtype, or whose fp32 dots are "ieee" off the CPU (CUDA cores: nothing for
TMA to feed, and the persistent kernels spilled there; the interpreter still runs them, which
tests their indexing) runs the tiled kernel.
"""
import os
import warnings

import torch
import triton.language as tl

from .autotune_mode import autotune_mode
from .capture import check_not_capturing
from .fit import shared_memory_limit
from .interpreter import interpreting
from .precision import dot_precision
from .persistent import describable

ENV = "LOWRANK_FUSED_TRITON_GEMM"
VARIANTS = ("auto", "tiled", "tma")

_winners = {}  # (launcher name, device, base dtype, shape key) -> "tiled" | "tma"

variant_hook = None
"""Set by the Triton backend (lowrank_fused.tuning.autotune.remembered_variant): called as
``variant_hook(name, dtype, key, time_variants)`` for a key not chosen in this process, it
returns "tiled" or "tma" from its own record, else from ``time_variants()`` ({variant: ms, or
None for one that failed}). None: the variants are timed in every process."""


def requested(variant=None) -> str:
    """The variant asked for: ``variant`` if given, else the environment's, else "auto"."""
    variant = variant or os.environ.get(ENV) or "auto"
    if variant not in VARIANTS:
        raise ValueError(f"{ENV} / variant: expected one of {VARIANTS}, got {variant!r}")
    return variant


def tma_supported(device: torch.device) -> bool:
    """Whether persistent TMA kernels can run on ``device``: the interpreter emulates them; on
    CUDA they need capability >= 9, a data-centre part's shared memory (their configs need more
    than the 99 KB of consumer parts) and a Triton with ``tl.make_tensor_descriptor``."""
    if device.type != "cuda":
        return True
    capability = torch.cuda.get_device_capability(device)
    return (capability[0] >= 9 and shared_memory_limit(capability) >= 200 * 1024
            and hasattr(tl, "make_tensor_descriptor"))


def use_tma(name: str, operands, variant, launch, key) -> bool:
    """Whether this call of launcher ``name`` runs the persistent TMA kernel. ``operands``: the
    2-D tensors the descriptors address (inputs and output); ``launch(variant)``: runs the call
    with "tiled" or "tma" forced (what "auto" times); ``key``: the shape key of the choice."""
    variant = requested(variant)
    device = operands[0].device
    dtypes = {t.dtype for t in operands}
    if (variant == "tiled" or not describable(*operands) or len(dtypes) != 1
            or (device.type != "cpu" and dot_precision(dtypes.pop()) == "ieee")
            or not tma_supported(device)):
        return False
    if variant == "auto":
        variant = _auto(name, device, operands[0].dtype, key, launch)
    return variant == "tma"


def _auto(name: str, device: torch.device, dtype: torch.dtype, key, launch) -> str:
    """What "auto" runs: the tiled kernel off a GPU, by rule without timing (quick mode,
    deterministic algorithms), else the faster variant, timed once per key."""
    if interpreting() or device.type != "cuda":
        return "tiled"
    if autotune_mode() == "quick":  # correctness runs: no timing; tiled serves every call
        return "tiled"
    if torch.are_deterministic_algorithms_enabled():
        # Timing noise could pick either variant from run to run, and the two round differently
        # (other tiles, other K steps): a fixed choice keeps results reproducible. Tiled, as it
        # serves every call (dropout, operands TMA cannot describe) and every GPU.
        return "tiled"
    cache_key = (name, device.index, dtype, key)  # a bf16 winner says nothing of fp16
    if cache_key not in _winners:
        if variant_hook is not None:  # remembered across processes; it checks capture itself
            _winners[cache_key] = variant_hook(name, dtype, key, lambda: _variant_times(launch))
        else:
            check_not_capturing(f"the GEMM variant of {name}")
            _winners[cache_key] = _faster(launch)
    return _winners[cache_key]


def _variant_times(launch) -> dict:
    """{"tiled": ms, "tma": ms} of the (autotuned) launches, by triton.testing.do_bench; None
    for a variant that raises (with a warning: the other runs); if both raise, the tiled one's
    error."""
    from triton.testing import do_bench
    times, errors = {}, {}
    for variant in ("tiled", "tma"):
        try:
            launch(variant)  # its own autotuner settles first, outside the timing
            times[variant] = do_bench(lambda: launch(variant), warmup=5, rep=25)
        except Exception as error:  # any failure leaves the other variant
            errors[variant] = error
    if not times:
        raise errors["tiled"]
    for variant, error in errors.items():
        warnings.warn(f"lowrank_fused: the {variant!r} GEMM variant failed ({error!r}); the "
                      f"other runs for this shape", RuntimeWarning, stacklevel=3)
        times[variant] = None
    return times


def _faster(launch) -> str:
    """The faster variant of ``_variant_times``."""
    times = {variant: ms for variant, ms in _variant_times(launch).items() if ms is not None}
    return min(times, key=times.get)
