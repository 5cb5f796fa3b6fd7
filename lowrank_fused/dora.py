"""DoRA on the operator: the magnitude-scaled layer without the dense N x K product W + s·B·A.

    c = m / ‖W + s·B_eff·A‖_row          (detached, as DoRA §4.3 and PEFT do)
    y = c ⊙ (x·Wᵀ + s·P·B_effᵀ) + bias                       (no dropout, or eval)
    y = x·Wᵀ + bias + (c − 1) ⊙ x̃·Wᵀ + c ⊙ s·P·B_effᵀ         (dropout in training: PEFT's rule)

with P = x̃·Aᵀ, x̃ = dropout(x) (the project's seeded mask).

The row norm is factored (``row_norm``): ‖W_n + s·b_n·A‖² = ‖W_n‖² + 2s·b_n·(A·W_nᵀ) +
s²·b_n·(A·Aᵀ)·b_nᵀ, in fp32 (fp64 for fp64 tensors), so no N x K tensor is formed per step; taken
as ‖W_n‖·sqrt(1 + (2s·b_n·(A·W_nᵀ) + s²·b_n·(A·Aᵀ)·b_nᵀ) / ‖W_n‖²) with ‖W_n‖ from
``torch.linalg.norm`` as PEFT takes it, so where B·A = 0 (PEFT's initialisation) the norm, and so
c = 1, are PEFT's exactly (PEFT's test_lora_use_dora_linear compares the output at init to the
base's with allclose's default atol 1e-8). The terms of frozen tensors (‖W_n‖, and W·Aᵀ when A is
frozen) are cached and recomputed when the
tensor changes (identity, storage or version counter). Rows where the sum cancels (B·A close to
−W: the result below ``CANCEL_RATIO`` of ‖W_n‖² + s²‖b_n·A‖²) are recomputed densely, those rows
only, so the norm keeps fp32's relative accuracy there too.

A 4-bit (bitsandbytes) W, QDoRA: the norm's terms of W come from W dequantized (bitsandbytes'
values, in fp32) when they are computed, and are cached as a dense W's are; the forward and
backward dequantize per call, as every 4-bit call does (``quantized``).

Backward: with G' = c ⊙ G, the gradients of x, A, B, R are the plain operator's for G' (the
backend's ``backward``), plus, with dropout, the term of x through (c − 1) ⊙ x̃·Wᵀ:
dx += H − dropout(H), H = ((1 − c) ⊙ G)·W. dm = Σ_rows G ⊙ Z / ‖·‖ with Z = x̃·Wᵀ + s·P·B_effᵀ
(x̃ = x without dropout), the one M x N tensor kept (in the base dtype, only when m trains);
dbias = Σ_rows G. Saved: P (M x r), Z when m trains, x only when A trains; dropout keeps its seed.
Without dropout and bias (and no c = 0), Z = y / c: the output y is what is kept (the op after
the layer often keeps it too, so it costs no bytes of its own; an in-place change of y before
backward then raises autograd's usual error).

Layering: this module is the functional op (called by ``functional.low_rank_linear`` with
``magnitude=``); the backend comes from ``dispatch.dora_choice``: the Triton backend
(triton_kernels/dora.py: c in the forward GEMM's epilogue, G scaled as the backward kernels load
it, dm and dbias reduced in the pass over G) for "triton", "cuda" (the CUDA extension has no
DoRA kernels) and "auto" on CUDA tensors; the reference backend otherwise, and for QDoRA.
"""
from __future__ import annotations

import weakref
from typing import Optional

import torch
from torch import Tensor

from . import dispatch, quantized, stats
from .dropout import DropoutSpec
from .errors import DoubleBackwardError
from .ops import _without_autocast

# A row whose factored ‖·‖² falls below this fraction of ‖W_n‖² + s²‖b_n·A‖² has lost more than
# about eps / CANCEL_RATIO of its relative accuracy to cancellation: it is recomputed densely.
CANCEL_RATIO = 1e-2

_CACHE_LIMIT = 1024
_weight_sq_cache: dict = {}   # id(W) -> (ref W, key, ‖W_n‖²)
_weight_norm_cache: dict = {}  # id(W) -> (ref W, key, ‖W_n‖ as torch.linalg.norm gives it)
_weight_a_cache: dict = {}    # (id(W), id(A)) -> (ref W, ref A, key, W·Aᵀ)


def _acc_dtype(t: Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _key(t: Tensor) -> tuple:
    # a 4-bit weight: its packed bytes and its quant state's absmax (requantizing replaces it)
    state = getattr(t, "quant_state", None) if quantized.is_4bit(t) else None
    absmax = None if state is None else (id(state.absmax), state.absmax._version)
    return (t.data_ptr(), t._version, tuple(t.shape), t.dtype, t.device, absmax)


def _cached(cache: dict, tensors: tuple, compute):
    """compute() cached on the identity, storage and version of ``tensors``."""
    ident = tuple(id(t) for t in tensors)
    key = tuple(_key(t) for t in tensors)
    hit = cache.get(ident)
    if hit is not None:
        refs, old_key, value = hit
        if all(r() is t for r, t in zip(refs, tensors)) and old_key == key:
            return value
    value = compute()
    if len(cache) >= _CACHE_LIMIT:
        cache.clear()
    cache[ident] = (tuple(weakref.ref(t) for t in tensors), key, value)
    return value


def clear_cache() -> None:
    """Drop the cached ‖W_n‖² and W·Aᵀ terms (they are also recomputed when a tensor changes)."""
    _weight_sq_cache.clear()
    _weight_norm_cache.clear()
    _weight_a_cache.clear()


def _dense(weight: Tensor, acc: torch.dtype) -> Tensor:
    """W in ``acc``; a 4-bit weight dequantized (bitsandbytes' values, a transient)."""
    return quantized.dequantize(weight, acc) if quantized.is_4bit(weight) else weight.to(acc)


def _acc_of(weight: Tensor) -> torch.dtype:
    return torch.float32 if quantized.is_4bit(weight) else _acc_dtype(weight)


def weight_row_sq(weight: Tensor) -> Tensor:
    """‖W_n‖² per row, accumulated in fp32 (fp64 for fp64), cached while W is unchanged."""
    acc = _acc_of(weight)
    return _cached(_weight_sq_cache, (weight,),
                   lambda: _dense(weight, acc).square().sum(1))


def weight_row_norm(weight: Tensor) -> Tensor:
    """‖W_n‖ per row as PEFT computes it (``torch.linalg.norm(W, dim=1)``, in fp32, fp64 for
    fp64), cached while W is unchanged: where B·A = 0 (PEFT's initialisation) the factored norm
    is this value exactly, so c = m / ‖·‖ is exactly 1 there, as in PEFT."""
    acc = _acc_of(weight)
    return _cached(_weight_norm_cache, (weight,),
                   lambda: torch.linalg.norm(_dense(weight, acc), dim=1))


def _weight_times_a(weight: Tensor, lora_a: Tensor) -> Tensor:
    """W·Aᵀ (N x r) in the accumulation dtype; cached when A is frozen."""
    acc = _acc_of(weight)

    def compute():
        return _dense(weight, acc) @ lora_a.to(acc).T

    if lora_a.requires_grad:
        return compute()
    return _cached(_weight_a_cache, (weight, lora_a), compute)


@torch.no_grad()
def row_norm(weight: Tensor, lora_a: Tensor, lora_b_eff: Tensor, scaling: float) -> Tensor:
    """‖W + s·B_eff·A‖ per row (N,), detached, in fp32 (fp64 for fp64 tensors), without the
    dense N x K product (see the module docstring)."""
    acc = _acc_of(weight)
    s = float(scaling)
    a = lora_a.detach().to(acc)
    b = lora_b_eff.detach().to(acc)
    w = weight.detach() if weight.requires_grad else weight
    w_norm = weight_row_norm(w)
    wa = _weight_times_a(w, lora_a)
    ba_sq = ((b @ (a @ a.T)) * b).sum(1)                    # ‖b_n·A‖²
    cross = (b * wa).sum(1)                                  # b_n·(A·W_nᵀ)
    w_sq = w_norm.square()
    extra = (2.0 * s) * cross + (s * s) * ba_sq
    sq = w_sq + extra
    scale = w_sq + (s * s) * ba_sq
    if sq.is_meta:  # shapes only
        return sq
    # ‖W_n‖·sqrt(1 + extra/‖W_n‖²): the same fp32 accuracy as sqrt(sq), and exactly PEFT's
    # ‖W_n‖ where the low-rank terms vanish (B = 0 at initialisation)
    norm = w_norm * (1.0 + extra / w_sq).clamp_min(0).sqrt()
    zero = w_sq == 0
    if bool(zero.any()):
        norm = torch.where(zero, sq.clamp_min(0).sqrt(), norm)
    bad = sq < CANCEL_RATIO * scale
    if bool(bad.any()):
        rows = bad.nonzero().squeeze(1)
        dense = _dense(weight, acc)[rows] + s * (b[rows] @ a)
        norm = norm.clone()
        norm[rows] = dense.square().sum(1).sqrt()
    return norm


def check_magnitude(magnitude, weight_rows: int, lora_a: Tensor, x: Tensor) -> None:
    """magnitude: a floating tensor of shape (N,), the adapters' dtype, x's device."""
    if not isinstance(magnitude, Tensor):
        raise TypeError(f"magnitude must be a torch.Tensor of shape (N,), got {type(magnitude).__name__}")
    if not magnitude.is_floating_point():
        raise TypeError(f"magnitude must have a floating-point dtype, got {magnitude.dtype}")
    if tuple(magnitude.shape) != (weight_rows,):
        raise ValueError(f"magnitude must have shape ({weight_rows},) (N from weight), "
                         f"got {tuple(magnitude.shape)}")
    if magnitude.dtype != lora_a.dtype:
        raise TypeError(f"magnitude must have the adapters' dtype {lora_a.dtype} (lora_a's), "
                        f"got {magnitude.dtype}")
    if magnitude.device != x.device:
        raise ValueError(f"magnitude must be on x's device {x.device}, got {magnitude.device}")


class DoraLowRank(torch.autograd.Function):
    """The DoRA operator on 2-D x (eager; torch.compile runs it as a graph break)."""

    @staticmethod
    def forward(ctx, x, weight, bias, lora_a, lora_b, latent, magnitude, scaling, dropout_p,
                seed, backend, name=None):
        impl = dispatch.backend_module(backend, x.device)
        backend_name = impl.__name__.rpartition(".")[2]
        stats.record(name, backend_name, "forward")
        b_eff = lora_b if latent is None else lora_b @ latent.T
        norm = row_norm(weight, lora_a, b_eff, scaling)
        c = magnitude.detach().to(norm.dtype) / norm
        dropout = DropoutSpec(dropout_p, int(seed)) if dropout_p > 0.0 else None
        need_x, need_w, need_bias, need_a, need_b, need_latent, need_m = ctx.needs_input_grad[:7]
        # Without dropout and bias, Z = y / c: keep y itself (the output, which the next op often
        # keeps anyway: no bytes of its own) instead of a separate M x N Z; not where some c = 0.
        z_from_y = bool(need_m and dropout is None and bias is None and not c.is_meta
                        and not bool((c == 0).any()))
        y, p, z = impl.dora_forward(x, weight, bias, lora_a, b_eff.detach(), scaling, dropout, c,
                                    need_z=need_m and not z_from_y)
        ctx.save_for_backward(x if need_a else None,
                              p if (need_b or need_latent) else None,
                              y if z_from_y else z, weight, lora_a, lora_b, latent)
        ctx.z_from_y = z_from_y
        ctx.c, ctx.norm = c, norm  # N-vectors, not activations of size M
        ctx.scaling, ctx.dropout, ctx.impl = scaling, dropout, impl
        ctx.m_dtype = magnitude.dtype
        ctx.name, ctx.backend_name = name, backend_name
        return y

    @staticmethod
    def backward(ctx, grad_y):
        if torch.is_grad_enabled():
            raise DoubleBackwardError(
                "lowrank_fused does not support double backward through the DoRA operator "
                "(create_graph=True): second-order gradients would come out wrong")
        x, p, z, weight, lora_a, lora_b, latent = ctx.saved_tensors
        need_x, need_w, need_bias, need_a, need_b, need_latent, need_m = ctx.needs_input_grad[:7]
        if need_w:
            raise RuntimeError("the DoRA operator keeps W frozen: weight must not require grad")
        stats.record(ctx.name, ctx.backend_name, "backward")
        # autocast off, as in the plain backward: the products keep the saved tensors' dtypes
        dx, da, db, dr, dbias, dm = _without_autocast(
            grad_y, ctx.impl.dora_backward, grad_y.contiguous(), x, p, z, weight, lora_a, lora_b, latent, ctx.scaling,
            ctx.dropout, ctx.c, ctx.norm, need_x=need_x, need_a=need_a, need_b=need_b,
            need_latent=need_latent and latent is not None, need_bias=need_bias,
            need_m=need_m, z_is_output=ctx.z_from_y)
        if dm is not None:
            dm = dm.to(ctx.m_dtype)
        return dx, None, dbias, da, db, dr, dm, None, None, None, None, None
