"""When nothing may be timed: under torch.compile tracing (fall back to a recorded or default
choice) and under CUDA graph capture (the project's rule: raise CaptureError, whose message says
to run one eager step first; the kernels' autotuners and GEMM-variant choice follow it too).

The rule and its error are the kernels' (``triton_kernels.capture``), so one
``except CaptureError`` covers every choice; they are imported when first needed (the kernels
load Triton), and stated here where Triton is not installed."""
from __future__ import annotations

import functools

import torch


class _CaptureErrorWithoutTriton(RuntimeError):
    """A choice that needs timing was due while a CUDA graph was captured."""


@functools.lru_cache(maxsize=None)
def _rule():
    try:
        from ..triton_kernels import capture
    except ImportError:
        return _CaptureErrorWithoutTriton, None
    return capture.CaptureError, capture


def capture_error() -> type:
    """The CaptureError class in force."""
    return _rule()[0]


def check_not_capturing(what: str) -> None:
    """Raise CaptureError if a CUDA graph is being captured (``what`` names the choice due)."""
    error, capture = _rule()
    if capture is not None:
        capture.check_not_capturing(what)
    elif torch.cuda.is_initialized() and torch.cuda.is_current_stream_capturing():
        raise error(f"lowrank_fused: {what} is not chosen yet for this shape and a CUDA graph "
                    f"is being captured; run one step (one forward and backward) before "
                    f"capture so the choice is cached")


def tracing() -> bool:
    """Whether torch.compile (dynamo, or export) is tracing the current call."""
    is_compiling = getattr(torch.compiler, "is_compiling", None)
    return bool(is_compiling is not None and is_compiling())
