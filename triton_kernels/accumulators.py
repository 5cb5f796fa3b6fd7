"""Zeroed fp32 accumulators for the G pass's atomics (dB_eff, dbias), kept from call to call.

A fresh accumulator costs a memset launch, and rounding it to B's dtype a second launch; a kept
one is zero already, and one kernel (``take``) both writes the result in the output dtype and
re-zeroes the accumulator for the next call. Safe because of the following:

- the result is always a fresh tensor (autograd accumulates into, or may keep, what the backward
  returns; the custom op may not alias its outputs), so a float32 output takes no kept buffer:
  there the kernel writes straight into a fresh zeroed tensor, which costs no more;
- one accumulator per (thread, device, stream, shape), taken out of the pool while in use and
  put back only after ``take`` is queued: calls in stream order (the layers of one backward,
  two backward calls in a row) each find it zeroed; concurrent calls (another stream, another
  thread, a nested call) get their own; if a launch raises, it is never put back;
- none while a CUDA graph is being captured (its memory belongs to the graph's pool): a fresh
  tensor, as before;
- the autotuner's reset_to_zero zeroes the buffer it is given before each trial and before the
  real launch, which a kept, already zero buffer satisfies.
"""
import threading

import torch
import triton
import triton.language as tl

from .interpreter import interpreting
from .mma import narrow

_BLOCK = 1024
_local = threading.local()


@triton.jit
def _take_kernel(acc_ptr, out_ptr, numel, BLOCK: tl.constexpr):
    offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = offsets < numel
    acc = tl.load(acc_ptr + offsets, mask=ok, other=0.0)
    tl.store(out_ptr + offsets, narrow(acc, out_ptr.dtype.element_ty), mask=ok)
    tl.store(acc_ptr + offsets, tl.zeros_like(acc), mask=ok)


def _pool() -> dict:
    if not hasattr(_local, "pool"):
        _local.pool = {}
    return _local.pool


def _key(shape, device: torch.device):
    """The pool key, or None where no accumulator may be kept."""
    if device.type == "cuda":
        if torch.cuda.is_current_stream_capturing():
            return None
        return (device, torch.cuda.current_stream(device).cuda_stream, tuple(shape))
    if device.type == "cpu" and interpreting():  # the interpreter runs the kernels on CPU
        return (device, None, tuple(shape))
    return None  # meta and fake tensors: nothing runs


def acquire(shape, device: torch.device, out_dtype: torch.dtype) -> torch.Tensor:
    """A zeroed fp32 tensor of ``shape`` for atomics to accumulate into; give it to ``take``."""
    key = _key(shape, device) if out_dtype != torch.float32 else None
    kept = _pool().pop(key, None) if key is not None else None
    return kept if kept is not None else torch.zeros(shape, dtype=torch.float32, device=device)


def take(acc: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
    """``acc``'s values as a fresh tensor of ``out_dtype``; a kept accumulator is zeroed by the
    same kernel and goes back to the pool."""
    key = _key(acc.shape, acc.device) if out_dtype != torch.float32 else None
    if key is None:
        return acc.to(out_dtype)  # a fresh fp32 accumulator is the result itself
    out = torch.empty(acc.shape, dtype=out_dtype, device=acc.device)
    numel = acc.numel()
    if numel:
        _take_kernel[(triton.cdiv(numel, _BLOCK),)](acc, out, numel, BLOCK=_BLOCK)
    _pool()[key] = acc
    return out
