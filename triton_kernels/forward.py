"""Forward: P = dropout(x)·Aᵀ (skinny pass), then y = x·Wᵀ + bias + (s·P)·B_effᵀ in one GEMM whose
K loop is extended by r steps, so the low-rank term lands in the base accumulator and no M x N
intermediate is ever written."""
import torch
import triton
import triton.language as tl

from . import persistent, variants
from .autotuner import launcher, m_bucket
from .configs import for_base, rank_block
from .dropout import keep_pairs, pair_columns, seed_arg
from .low_rank import low_rank_tile
from .mma import mma, narrow
from .precision import dot_precision, low_rank_dot_dtype
from .tiling import (add_bias, grouped_tile, matmul_tile, offsets_2d, store_tile, stream,
                     tile_span)


# seed not specialised: a seed that is 1 or a multiple of 16 would compile the kernel again.
@triton.jit(do_not_specialize=["seed"])
def _project_kernel(x_ptr, a_ptr, p_ptr, xd_ptr, M, M_BUCKET, K, R,
                    stride_xm, stride_xk, stride_ar, stride_ak,
                    seed, p_drop, keep_scale,
                    HAS_DROPOUT: tl.constexpr, STORE_DROPPED: tl.constexpr,
                    DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
                    RANK_BLOCK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    # BLOCK_N is the width of the streamed K tile. STORE_DROPPED (with dropout; DoRA's forward):
    # also write dropout(x) in x's dtype to xd_ptr (M x K, contiguous), the values the
    # reference's x̃ has, for a GEMM that needs x̃·Wᵀ.
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    ranks = tl.arange(0, RANK_BLOCK)
    rank_ok = ranks < R
    # Rows past M read row M - 1 again instead of a row mask (each row of P is its own sum, and
    # those rows are never stored): one predicate fewer in the loop, where ptxas spilled the
    # row mask (sm_80, with dropout). row_ok is formed after the loop, for the store.
    x_rows = tl.minimum(rows, M - 1)
    acc = tl.zeros((BLOCK_M, RANK_BLOCK), dtype=tl.float32)
    if HAS_DROPOUT:
        # The tile as the mask's two column halves, one hash per pair of elements.
        cols_lo, cols_hi = pair_columns(0, BLOCK_N // 2)
        # Storing x̃, rows past M draw row M - 1's mask too and store row M - 1's own values
        # again (the same program, the same values): no row mask in the loop (ptxas spilled
        # one, sm_90a, r = 1). Their P is never stored, so its rows' masks do not matter.
        mask_rows = x_rows if STORE_DROPPED else rows
        x_lo = x_ptr + offsets_2d(x_rows, cols_lo, stride_xm, stride_xk)
        x_hi = x_ptr + offsets_2d(x_rows, cols_hi, stride_xm, stride_xk)
        a_lo = a_ptr + offsets_2d(cols_lo, ranks, stride_ak, stride_ar)
        a_hi = a_ptr + offsets_2d(cols_hi, ranks, stride_ak, stride_ar)
        x_step = tl.full((), BLOCK_N, tl.int64) * stride_xk
        a_step = tl.full((), BLOCK_N, tl.int64) * stride_ak
        for k0 in range(0, K, BLOCK_N):
            lo_ok = (k0 + cols_lo) < K
            hi_ok = (k0 + cols_hi) < K
            keep_lo, keep_hi = keep_pairs(seed, mask_rows, k0 + cols_lo, p_drop)
            for half in tl.static_range(2):  # the low columns, then the high ones
                x_ptrs, a_ptrs = (x_lo, a_lo) if half == 0 else (x_hi, a_hi)
                ok, keep = (lo_ok, keep_lo) if half == 0 else (hi_ok, keep_hi)
                x = tl.load(x_ptrs, mask=ok[None, :], other=0.0)
                a_t = tl.load(a_ptrs, mask=ok[:, None] & rank_ok[None, :], other=0.0)
                x = x.to(tl.float32) * tl.where(keep, keep_scale, 0.0)  # NaN·0 = NaN
                if STORE_DROPPED:
                    cols = k0 + (cols_lo if half == 0 else cols_hi)
                    tl.store(xd_ptr + offsets_2d(x_rows, cols, K, 1),
                             narrow(x, xd_ptr.dtype.element_ty), mask=ok[None, :])
                acc = mma(narrow(x, DOT_DTYPE), narrow(a_t, DOT_DTYPE), acc, PRECISION)
            x_lo += x_step
            x_hi += x_step
            a_lo += a_step
            a_hi += a_step
    else:
        ks = tl.arange(0, BLOCK_N)
        x_ptrs, x_step = stream(x_ptr, x_rows, ks, stride_xm, stride_xk, stride_xk, BLOCK_N)
        a_ptrs, a_step = stream(a_ptr, ks, ranks, stride_ak, stride_ar, stride_ak, BLOCK_N)
        for k0 in range(0, K, BLOCK_N):
            col_ok = (k0 + ks) < K
            x = tl.load(x_ptrs, mask=col_ok[None, :], other=0.0)
            a_t = tl.load(a_ptrs, mask=col_ok[:, None] & rank_ok[None, :], other=0.0)
            acc = mma(narrow(x, DOT_DTYPE), narrow(a_t, DOT_DTYPE), acc, PRECISION)
            x_ptrs += x_step
            a_ptrs += a_step
    row_ok = rows < M
    tl.store(p_ptr + offsets_2d(rows, ranks, R, 1), narrow(acc, p_ptr.dtype.element_ty),
             mask=row_ok[:, None] & rank_ok[None, :])


# y = x·Wᵀ + bias + s·P·B_effᵀ = [x | s·P]·[W | B_eff]ᵀ: the r low-rank steps of the K loop first
# (low_rank.py), then x·Wᵀ; nothing of size M x N but y is written. Backward: backward.py.
@triton.jit
def _fused_linear_kernel(x_ptr, w_ptr, bias_ptr, p_ptr, b_ptr, y_ptr, M, M_BUCKET, N, K, R,
                         scaling,
                         stride_xm, stride_xk, stride_wn, stride_wk, stride_bn, stride_br,
                         stride_bias,
                         HAS_BIAS: tl.constexpr, PRECISION: tl.constexpr,
                         DOT_DTYPE: tl.constexpr, LR_PRECISION: tl.constexpr,
                         RANK_BLOCK: tl.constexpr,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                         GROUP_M: tl.constexpr):
    pid_m, pid_n = grouped_tile(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
    rows, row_ok = tile_span(pid_m, BLOCK_M, M)
    cols, col_ok = tile_span(pid_n, BLOCK_N, N)
    acc = low_rank_tile(p_ptr, b_ptr, rows, cols, row_ok, col_ok, R, scaling, stride_br,
                        stride_bn, DOT_DTYPE, LR_PRECISION, RANK_BLOCK)
    acc = matmul_tile(acc, x_ptr, w_ptr, rows, cols, row_ok, col_ok, K, stride_xm, stride_xk,
                      stride_wk, stride_wn, PRECISION, BLOCK_K)
    if HAS_BIAS:
        acc = add_bias(acc, bias_ptr, cols, col_ok, stride_bias)
    store_tile(y_ptr, acc, rows, cols, row_ok, col_ok, N)


def project(x: torch.Tensor, lora_a: torch.Tensor, seed: int = 0, p_drop: float = 0.0
            ) -> torch.Tensor:
    """P = dropout(x)·Aᵀ, shape (M, r), in A's dtype; dropout is applied when p_drop > 0."""
    return _project(x, lora_a, seed, p_drop, None)


def project_dropped(x: torch.Tensor, lora_a: torch.Tensor, seed: int, p_drop: float):
    """(P, x̃): ``project``'s P and, from the same pass over x, x̃ = dropout(x) (M, K) in x's
    dtype (p_drop > 0): DoRA's forward needs x̃·Wᵀ beside x·Wᵀ. x̃ is a transient of the
    forward (never saved); the mask itself is never stored."""
    dropped = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    return _project(x, lora_a, seed, p_drop, dropped), dropped


def _project(x, lora_a, seed, p_drop, dropped):
    m, k = x.shape
    r = lora_a.shape[0]
    p = torch.empty((m, r), dtype=lora_a.dtype, device=x.device)
    if m == 0:
        return p
    store_dropped = dropped is not None and p_drop > 0.0
    dot_dtype = low_rank_dot_dtype(x.dtype, lora_a.dtype)
    kernel, meta = launcher(_project_kernel, for_base("skinny", x.dtype), key=[
        "M_BUCKET", "K", "R", "HAS_DROPOUT", "STORE_DROPPED", "DOT_DTYPE", "PRECISION",
        "RANK_BLOCK"])
    grid = lambda META: (triton.cdiv(m, META["BLOCK_M"]),)  # noqa: E731
    kernel[grid](x, lora_a, p, dropped if store_dropped else p, m, m_bucket(m), k, r,
                 x.stride(0), x.stride(1),
                 lora_a.stride(0), lora_a.stride(1), seed_arg(seed), p_drop,
                 1.0 / (1.0 - p_drop), HAS_DROPOUT=p_drop > 0.0, STORE_DROPPED=store_dropped,
                 DOT_DTYPE=dot_dtype, PRECISION=dot_precision(dot_dtype),
                 RANK_BLOCK=rank_block(r), **meta)
    return p


def fused_linear(x: torch.Tensor, weight: torch.Tensor, bias, p: torch.Tensor,
                 lora_b_eff: torch.Tensor, scaling: float, variant=None) -> torch.Tensor:
    """y = x·Wᵀ + bias + s·P·B_effᵀ, shape (M, N), in x's dtype. ``variant``: "tiled" (the
    kernel above), "tma" (persistent.py's) or "auto"; None: the environment's (variants.py)."""
    m, k = x.shape
    n = weight.shape[0]
    r = p.shape[1]
    y = torch.empty((m, n), dtype=x.dtype, device=x.device)
    if m == 0:
        return y
    if variants.use_tma("fused_linear", (x, weight, y), variant, lambda v: fused_linear(
            x, weight, bias, p, lora_b_eff, scaling, v), key=(
            triton.next_power_of_2(m), n, k, r, lora_b_eff.dtype, bias is not None)):
        return persistent.fused_linear(x, weight, bias, p, lora_b_eff, scaling, y)
    dot_dtype = low_rank_dot_dtype(x.dtype, lora_b_eff.dtype)
    kernel, meta = launcher(_fused_linear_kernel, for_base("gemm", x.dtype),
                            key=["M_BUCKET", "N", "K", "R", "HAS_BIAS", "PRECISION", "DOT_DTYPE",
                                 "LR_PRECISION", "RANK_BLOCK"])
    grid = lambda META: (triton.cdiv(m, META["BLOCK_M"]) * triton.cdiv(n, META["BLOCK_N"]),)  # noqa: E731
    kernel[grid](x, weight, bias if bias is not None else y, p, lora_b_eff, y, m, m_bucket(m),
                 n, k, r,
                 float(scaling), x.stride(0), x.stride(1), weight.stride(0), weight.stride(1),
                 lora_b_eff.stride(0), lora_b_eff.stride(1),
                 bias.stride(0) if bias is not None else 0, HAS_BIAS=bias is not None,
                 PRECISION=dot_precision(x.dtype), DOT_DTYPE=dot_dtype,
                 LR_PRECISION=dot_precision(dot_dtype),
                 RANK_BLOCK=rank_block(r), **meta)
    return y
