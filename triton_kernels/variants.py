"""Which kernel runs a main GEMM (fused_linear, grad_input): the tiled kernel (forward.py,
backward.py) or the persistent TMA kernel (persistent.py).

``LOWRANK_FUSED_TRITON_GEMM`` (or a launcher's ``variant=`` argument) asks for one:

- "auto" (default): on a GPU of capability >= 9 whose Triton has tensor descriptors, each
  variant is autotuned over its own configs, then the two winners are timed once per shape key
  (M bucketed to a power of two) and the faster is kept for that key; elsewhere, the
  interpreter included, the tiled kernel.
- "tiled": the tiled kernel.
- "tma": the persistent kernel (how the tests run it on the interpreter).

Whatever is asked, a call whose operands TMA cannot describe (``persistent.describable``), whose
operands differ in dtype, or whose fp32 dots are "ieee" off the CPU (CUDA cores: nothing for
TMA to feed, and the persistent kernels spilled there; the interpreter still runs them, which
tests their indexing) runs the tiled kernel.
"""
import os

import torch
import triton.language as tl

from .configs import dot_precision, interpreting, shared_memory_limit
from .persistent import describable

ENV = "LOWRANK_FUSED_TRITON_GEMM"
VARIANTS = ("auto", "tiled", "tma")

_winners = {}  # (launcher name, device, shape key) -> "tiled" | "tma"


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
        if interpreting() or device.type != "cuda":
            return False
        cache_key = (name, device.index, key)
        if cache_key not in _winners:
            _winners[cache_key] = _faster(launch)
        variant = _winners[cache_key]
    return variant == "tma"


def _faster(launch) -> str:
    """The variant whose (autotuned) launch is faster, by triton.testing.do_bench."""
    from triton.testing import do_bench
    times = {}
    for variant in ("tiled", "tma"):
        launch(variant)  # its own autotuner settles first, outside the timing
        times[variant] = do_bench(lambda: launch(variant), warmup=5, rep=25)
    return min(times, key=times.get)
