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

``weight`` may be a bitsandbytes ``Params4bit`` (``lowrank_fused.quantized``): this backend
dequantizes it to x's dtype per call, forward and backward, as ``bnb.matmul_4bit`` does (the
dense N x K tensor is a transient, dropped after its GEMM). The Triton backend dequantizes
inside its GEMMs' K loops instead (``dispatch.quantized_choice``); 4-bit DoRA (QDoRA) runs here.

``dropout_keep_mask(dropout, shape, device) -> bool tensor``
    The keep-mask the backend derives from ``dropout.seed``: True where x is kept.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .. import quantized
from ..dropout import DropoutSpec, fast_keep_mask, keep_mask_chunks


def dropout_keep_mask(dropout: DropoutSpec, shape, device) -> Tensor:
    # the bits of dropout.keep_mask, the definition (tests/test_dropout_mask.py)
    return fast_keep_mask(dropout.seed, dropout.p, tuple(shape), device)


def _mask_dtype(t: Tensor) -> torch.dtype:
    """The dtype ``t * keep * scale`` is computed in (torch's opmath: fp32 for 16-bit t), so a
    mask holding 0 / scale in it gives the same values as the two multiplies."""
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _dropout_chunks(t: Tensor, dropout: DropoutSpec):
    """(rows, mask) chunks of the keep-mask of t's shape, the mask holding 0 or keep_scale in
    _mask_dtype(t): a view the next chunk overwrites."""
    scale = dropout.keep_scale
    for rows, mask in keep_mask_chunks(dropout.seed, dropout.p, tuple(t.shape), t.device,
                                       _mask_dtype(t)):
        yield rows, mask.mul_(scale)


def _dropped(t: Tensor, dropout: DropoutSpec, dtype: torch.dtype, masks=None) -> Tensor:
    """t * keep * scale, computed in t's opmath dtype, written in ``dtype``; each mask chunk is
    also handed to ``masks(rows, mask)`` (backward applies it to the dx term with the same
    chunk), so the mask is made once per pass and never whole."""
    out = torch.empty(t.shape, dtype=dtype, device=t.device)
    for rows, mask in _dropout_chunks(t, dropout):
        torch.mul(t[rows], mask, out=out[rows])
        if masks is not None:
            masks(rows, mask)
    return out


def _apply_dropout(t: Tensor, dropout: Optional[DropoutSpec]) -> Tensor:
    if dropout is None:
        return t
    # A multiply, not a select: NaN/Inf in dropped elements give NaN, as F.dropout does.
    return _dropped(t, dropout, t.dtype)


def _as(t: Tensor, dtype: torch.dtype) -> Tensor:
    """t in dtype; skips the call when it already is (a no-op .to still costs a dispatch)."""
    return t if t.dtype == dtype else t.to(dtype)


def forward(x, weight, bias, lora_a, lora_b_eff, scaling, dropout):
    x_low = _as(x, lora_a.dtype) if dropout is None else _dropped(x, dropout, lora_a.dtype)
    p = x_low @ lora_a.T
    y = torch.nn.functional.linear(x, quantized.dense_like(weight, x.dtype), bias)
    if _fused_add(x, lora_a):
        y.addmm_(p, lora_b_eff.T, alpha=scaling)
    else:
        y += _as((p @ lora_b_eff.T).mul_(scaling), x.dtype)
    return y, p


def _fused_add(x: Tensor, lora_a: Tensor) -> bool:
    """Whether a low-rank term may be added by addmm_ (no M x N temporary): one dtype, 32 or 64
    bits. A 16-bit addmm_ would round once where the separate product rounds twice, and the
    kernels' tests measure PyTorch's 16-bit error on this backend (tests/tolerance.py)."""
    return x.dtype == lora_a.dtype and x.dtype in (torch.float32, torch.float64)


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
        if dropout is None:
            if need_x:
                dx = grad_y @ quantized.dense_like(weight, grad_y.dtype)
                if _fused_add(dx, lora_a):
                    dx.addmm_(dp, lora_a)
                else:
                    dx += _as(dp @ lora_a, dx.dtype)
                dx = _as(dx, grad_y.dtype)
            if need_a:
                da = dp.T @ _as(x, adapter_dtype)
        else:
            # One mask for both terms: dx's dropout(dP·A) and dA's dropout(x), chunk by chunk.
            low = dp @ lora_a if need_x else None

            def drop_low(rows, mask):
                low[rows].mul_(mask)

            if need_a:
                x_low = _dropped(x, dropout, adapter_dtype, drop_low if need_x else None)
                da = dp.T @ x_low
            elif need_x:
                for rows, mask in _dropout_chunks(low, dropout):
                    drop_low(rows, mask)
            if need_x:
                dx = grad_y @ quantized.dense_like(weight, grad_y.dtype)
                dx += _as(low, dx.dtype)
                dx = _as(dx, grad_y.dtype)
    if need_b:
        db = scaling * (grad_lr.T @ latent_operands(p, latent, need_b))
    if need_bias:
        dbias = grad_y.sum(0)
    return dx, da, db, dr, dbias


# DoRA (lowrank_fused.dora): c = m / ‖W + s·B_eff·A‖_row, detached, given as an (N,) vector in
# the accumulation dtype (fp32, fp64 for fp64 tensors). The Triton backend has the same two
# functions (its kernels fuse c); dispatch.dora_choice routes "cuda" to it.

def dora_forward(x, weight, bias, lora_a, lora_b_eff, scaling, dropout, c, *, need_z):
    """(y, p, z): y by DoRA's rule, in PEFT's order: x·Wᵀ + bias + (c − 1) ⊙ x̃·Wᵀ +
    c ⊙ s·P·B_effᵀ (x̃ = x without dropout: c ⊙ (x·Wᵀ + s·P·B_effᵀ) + bias), p = x̃·Aᵀ, and
    z = x̃·Wᵀ + s·P·B_effᵀ in x's dtype when ``need_z`` (what dm needs), else None. x̃ is a
    transient."""
    w = quantized.dense_like(weight, x.dtype)
    if dropout is None:
        x_drop = x
        p = _as(x, lora_a.dtype) @ lora_a.T
    else:
        x_drop = _dropped(x, dropout, x.dtype)
        p = _as(x_drop, lora_a.dtype) @ lora_a.T
    lr = (p @ lora_b_eff.T).mul_(scaling)                  # adapters' dtype
    # PEFT's order of operations: base = x·Wᵀ + bias (the base layer's own addmm), then
    # y = base + (c − 1) ⊙ x̃·Wᵀ + c ⊙ s·P·B_effᵀ, so y is the base output exactly where c = 1
    # and B = 0 (PEFT's initialisation; its tests compare there with allclose's atol 1e-8)
    fused_bias = bias is not None and bias.dtype == x.dtype
    base = torch.nn.functional.linear(x, w, bias if fused_bias else None)
    if dropout is None:
        z = base - bias if fused_bias else base            # x·Wᵀ as PEFT takes it
    else:
        z = torch.nn.functional.linear(x_drop, w)          # x̃·Wᵀ, x's dtype
    del x_drop
    z_acc, lr_acc = _as(z, c.dtype), _as(lr, c.dtype)
    z_keep = _as(z_acc + lr_acc, x.dtype) if need_z else None   # Z = x̃·Wᵀ + s·P·B_effᵀ
    out = _as(base, c.dtype) + (c - 1.0) * z_acc
    out += c * lr_acc
    if bias is not None and not fused_bias:
        out += bias
    return _as(out, x.dtype), p, z_keep


def dora_backward(grad_y, x, p, z, weight, lora_a, lora_b, latent, scaling, dropout, c, norm, *,
                  need_x, need_a, need_b, need_latent, need_bias, need_m, z_is_output=False):
    """(dx, dA, dB, dR, dbias, dm): the plain backward for G' = c ⊙ G, plus with dropout
    dx += H − dropout(H), H = ((1 − c) ⊙ G)·W; dm = Σ_rows G ⊙ Z / ‖·‖ (c detached).
    ``z_is_output``: ``z`` is the output y (no dropout, no bias, no c = 0), so Z = y / c."""
    if need_m and z_is_output:
        z = _as(z, c.dtype) / c
    g_acc = _as(grad_y, c.dtype)
    g_scaled = _as(g_acc * c, grad_y.dtype)
    if dropout is None or not need_x:
        dx, da, db, dr, _ = backward(g_scaled, x, p, weight, lora_a, lora_b, scaling, dropout,
                                     latent=latent, need_x=need_x, need_a=need_a, need_b=need_b,
                                     need_latent=need_latent, need_bias=False)
    else:
        # dx = G·W + dropout(((c − 1) ⊙ G)·W + dP·A): both dropped terms under one mask pass,
        # which also gives dA's x̃ (chunk by chunk, as the plain backward does)
        _, _, db, dr, _ = backward(g_scaled, x, p, weight, lora_a, lora_b, scaling, dropout,
                                   latent=latent, need_x=False, need_a=False, need_b=need_b,
                                   need_latent=need_latent, need_bias=False)
        adapter_dtype = lora_a.dtype
        dp = scaling * (_as(g_scaled, adapter_dtype) @ lora_b)
        if latent is not None:
            dp = dp @ _as(latent, dp.dtype).T
        w = quantized.dense_like(weight, grad_y.dtype)
        low = _as(_as(g_acc * (c - 1.0), grad_y.dtype) @ w, c.dtype)
        low += _as(dp @ lora_a, c.dtype)

        def drop_low(rows, mask):
            low[rows].mul_(mask)

        da = None
        if need_a:
            da = dp.T @ _dropped(x, dropout, adapter_dtype, drop_low)
        else:
            for rows, mask in _dropout_chunks(low, dropout):
                drop_low(rows, mask)
        dx = grad_y @ w
        dx = _as(dx.to(c.dtype).add_(low), grad_y.dtype) if dx.dtype != c.dtype else dx.add_(low)
    dbias = grad_y.sum(0) if need_bias else None
    dm = None
    if need_m:
        dm = torch.einsum("mn,mn->n", g_acc, _as(z, c.dtype)) / norm
    return dx, da, db, dr, dbias, dm
