"""Reference backend: plain PyTorch. The CPU path and the ground truth for every kernel.

Contract shared by all backends (x is 2-D, (M, K)):

``forward(x, weight, bias, lora_a, lora_b_eff, scaling, dropout) -> (y, p)``
    y = x Wᵀ + bias + scaling · p · B_effᵀ  in x's dtype, and p = dropout(x) Aᵀ (M, r) in the
    adapters' dtype; p is what backward needs instead of x when A is frozen.

``backward(grad_y, x, p, weight, lora_a, lora_b, scaling, dropout, *, latent=None, need_x,
need_a, need_b, need_latent=False, need_bias) -> (dx, da, db, dr, dbias)``
    Gradients asked for, ``None`` for the rest. ``x`` may be ``None`` unless ``need_a``; ``p``
    may be ``None`` unless ``need_b`` or ``need_latent``. Each gradient has its own tensor's
    dtype. With a ``latent`` R (LoRA-XS; forward ran on B_eff = B·Rᵀ) the pass over G runs on B
    and P·R (``latent_operands``): it gives T = s·G·B and dB = s·Gᵀ·P·R at once, then
    dP = T·Rᵀ and dR = Pᵀ·T (``latent_gradients``). So dR needs no dB_eff (no N x r reduction,
    no atomics when B is frozen) and never rounds P to a 16-bit dot operand.

``dropout_keep_mask(dropout, shape, device) -> bool tensor``
    The keep-mask the backend derives from ``dropout.seed``: True where x is kept.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ..dropout import DropoutSpec, keep_mask


def dropout_keep_mask(dropout: DropoutSpec, shape, device) -> Tensor:
    rows, cols = shape
    return keep_mask(dropout.seed, dropout.p, torch.arange(rows, device=device),
                     torch.arange(cols, device=device))


def _apply_dropout(t: Tensor, dropout: Optional[DropoutSpec]) -> Tensor:
    if dropout is None:
        return t
    keep = dropout_keep_mask(dropout, t.shape, t.device)
    # A multiply, not a select: NaN/Inf in dropped elements give NaN, as F.dropout does.
    return t * keep * dropout.keep_scale


def _as(t: Tensor, dtype: torch.dtype) -> Tensor:
    """t in dtype; skips the call when it already is (a no-op .to still costs a dispatch)."""
    return t if t.dtype == dtype else t.to(dtype)


def forward(x, weight, bias, lora_a, lora_b_eff, scaling, dropout):
    p = _as(_apply_dropout(x, dropout), lora_a.dtype) @ lora_a.T
    low_rank = scaling * (p @ lora_b_eff.T)
    y = torch.nn.functional.linear(x, weight, bias) + _as(low_rank, x.dtype)
    return y, p


def latent_operands(p, latent, need_b):
    """P's stand-in for the pass over G: P·R with a latent R (where dB is asked for), else P."""
    if latent is None or not need_b:
        return p
    return p @ _as(latent, p.dtype)


def latent_gradients(t, p, latent, need_dp, need_latent):
    """(dP, dR) from T = s·G·B, the pass over G's r-wide result, with a latent R; both r-wide
    products in T's dtype (fp32 from the kernels), dR then in R's dtype."""
    dp = t @ _as(latent, t.dtype).T if need_dp else None
    dr = _as(_as(p, t.dtype).T @ t, latent.dtype) if need_latent else None
    return dp, dr


def backward(grad_y, x, p, weight, lora_a, lora_b, scaling, dropout, *, latent=None,
             need_x, need_a, need_b, need_latent=False, need_bias):
    adapter_dtype = lora_a.dtype
    grad_lr = _as(grad_y, adapter_dtype)
    need_latent = need_latent and latent is not None
    dx = da = db = dr = dbias = None
    dp = None
    if need_x or need_a or need_latent:
        dp = scaling * (grad_lr @ lora_b)  # (M, r); T = s·G·B with a latent
        if latent is not None:
            dp, dr = latent_gradients(dp, p, latent, need_x or need_a, need_latent)
        if need_x:
            dx_low_rank = _apply_dropout(dp @ lora_a, dropout)
            dx = _as(grad_y @ weight + _as(dx_low_rank, grad_y.dtype), weight.dtype)
        if need_a:
            da = dp.T @ _as(_apply_dropout(x, dropout), adapter_dtype)
    if need_b:
        db = scaling * (grad_lr.T @ latent_operands(p, latent, need_b))
    if need_bias:
        dbias = grad_y.sum(0)
    return dx, da, db, dr, dbias
