"""The CUDA-graph-capture guard: a kernel choice that would time launches (autotuning, the GEMM
variant) may not run while a graph is captured; it must be cached by an eager step first."""
import torch

from .autotune_mode import AUTOTUNE_ENV


class CaptureError(RuntimeError):
    """A kernel choice (autotuning, variant timing) was due while a CUDA graph was captured."""


def capturing() -> bool:
    """Whether the current CUDA stream is capturing a graph (never, where CUDA is not up)."""
    return torch.cuda.is_initialized() and torch.cuda.is_current_stream_capturing()


def check_not_capturing(what: str) -> None:
    """Raise CaptureError if a graph is being captured: timing would run kernels (and sync)
    inside the capture, so a choice must be cached by one eager step first."""
    if capturing():
        raise CaptureError(
            f"lowrank_fused: {what} is not chosen yet for this shape and a CUDA graph is being "
            f"captured; run one step (one forward and backward) before capture so the choice "
            f"is cached, or set {AUTOTUNE_ENV}=quick (choice by rule, no timing)")
