"""One cast of an input for the layers that read it: ``shared_cast(x, dtype)``.

Sibling layers read the same tensor (q/k/v read one normed hidden state, gate/up another). When
a served layer must cast x to its compute dtype (a 4-bit base computing in bf16 inside an fp32
model) and its adapters train A, the operator keeps the cast x for dA: one copy per layer, three
for q/k/v. Casting once and handing each sibling a view of the same copy keeps one.

Each sibling's gradient is still cast back to x's dtype on its own (``_SharedCast``), so autograd
sums them in x's dtype as with a cast per layer: the numbers are bit-identical, only the bytes
differ. The last copy is remembered (one entry per thread) while its source lives unchanged in
place; anything else casts anew. Under torch.compile it casts plainly.
"""
from __future__ import annotations

import threading
import weakref

import torch
from torch import Tensor

_last = threading.local()


class _SharedCast(torch.autograd.Function):
    """Forward: a view of the shared copy; backward: the gradient cast back to x's dtype."""

    @staticmethod
    def forward(ctx, x, copy):
        ctx.dtype = x.dtype
        return copy.view_as(copy)

    @staticmethod
    def backward(ctx, grad):
        return grad.to(ctx.dtype), None


def _copy_of(x: Tensor, dtype: torch.dtype) -> Tensor:
    """The detached copy of x in ``dtype``, shared while x is unchanged."""
    key = (x._version, dtype)
    entry = getattr(_last, "entry", None)
    if entry is not None and entry[0]() is x and entry[1] == key:
        return entry[2]
    copy = x.detach().to(dtype)
    _last.entry = (weakref.ref(x, _forget), key, copy)
    return copy


def shared_cast(x: Tensor, dtype: torch.dtype) -> Tensor:
    """``x.to(dtype)`` in value and gradient; the bytes of one copy for every call on the same,
    unmodified x."""
    if x.dtype == dtype:
        return x
    if torch.compiler.is_compiling() or torch.is_inference_mode_enabled():
        return x.to(dtype)
    copy = _copy_of(x, dtype)
    if torch.is_grad_enabled() and x.requires_grad:
        return _SharedCast.apply(x, copy)
    return copy.view_as(copy)  # a view: an in-place change by one caller is seen by autograd


def _forget(ref) -> None:
    # x is gone: drop its copy too (a layer that saved a view keeps the storage alive)
    entry = getattr(_last, "entry", None)
    if entry is not None and entry[0] is ref:
        _last.entry = None


def clear() -> None:
    """Forget the remembered copy (tests; nothing else needs it)."""
    _last.entry = None
