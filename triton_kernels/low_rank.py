"""The low-rank term's tiles, which every GEMM (forward, dx, DoRA's, the 4-bit and persistent
ones) computes first into the accumulator its main loop then continues: [x | s·P]·[W | B_eff]ᵀ
in the forward, [G | dP]·[W ; A] in dx (the K-extension). Computed first, the rank tiles are
dead before the main loop's pipeline fills."""
import triton
import triton.language as tl

from .dropout import keep_pairs, pair_columns
from .mma import mma, narrow
from .tiling import offsets_2d


@triton.jit
def low_rank_rows(ptr, rows, row_ok, R, scale, DOT_DTYPE: tl.constexpr,
                  RANK_BLOCK: tl.constexpr):
    """(scale·L)[rows, :] in DOT_DTYPE, L an M x r matrix with row stride r (P or dP): the left
    operand of the low-rank term (a literal scale of 1.0 costs nothing: the product folds)."""
    ranks = tl.arange(0, RANK_BLOCK)
    lhs = tl.load(ptr + offsets_2d(rows, ranks, R, 1),
                  mask=row_ok[:, None] & (ranks < R)[None, :], other=0.0)
    return narrow(lhs.to(tl.float32) * scale, DOT_DTYPE)


@triton.jit
def low_rank_product(lhs, rhs_ptr, cols, col_ok, R, stride_rhs_r, stride_rhs_c,
                     DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
                     RANK_BLOCK: tl.constexpr):
    """fp32 lhs·Rt[:, cols], Rt r x N through strides (B_effᵀ or A), its rows past r zero."""
    ranks = tl.arange(0, RANK_BLOCK)
    rhs = tl.load(rhs_ptr + offsets_2d(ranks, cols, stride_rhs_r, stride_rhs_c),
                  mask=(ranks < R)[:, None] & col_ok[None, :], other=0.0)
    return mma(lhs, narrow(rhs, DOT_DTYPE),
               tl.zeros((lhs.shape[0], cols.shape[0]), dtype=tl.float32), PRECISION)


@triton.jit
def low_rank_tile(lhs_ptr, rhs_ptr, rows, cols, row_ok, col_ok, R, scale, stride_rhs_r,
                  stride_rhs_c, DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
                  RANK_BLOCK: tl.constexpr):
    """fp32 tile (scale·L)[rows, :]·Rt[:, cols]: s·P·B_effᵀ (forward) or dP·A (dx), L and Rt
    as in ``low_rank_rows`` and ``low_rank_product``. Both operands are loaded before either is
    rounded: composed of those two helpers (L rounded before Rt is loaded), the same operations
    cost up to 10 more registers in tools.aot_check's builds (persistent forward, r = 128)."""
    ranks = tl.arange(0, RANK_BLOCK)
    rank_ok = ranks < R
    lhs = tl.load(lhs_ptr + offsets_2d(rows, ranks, R, 1),
                  mask=row_ok[:, None] & rank_ok[None, :], other=0.0)
    rhs = tl.load(rhs_ptr + offsets_2d(ranks, cols, stride_rhs_r, stride_rhs_c),
                  mask=rank_ok[:, None] & col_ok[None, :], other=0.0)
    return mma(narrow(lhs.to(tl.float32) * scale, DOT_DTYPE), narrow(rhs, DOT_DTYPE),
               tl.zeros((lhs.shape[0], cols.shape[0]), dtype=tl.float32), PRECISION)


@triton.jit
def dropped_low_rank_halves(dp, a_ptr, rows, first_col, K, R, stride_ar, stride_ak, seed,
                            p_drop, keep_scale, DOT_DTYPE: tl.constexpr,
                            PRECISION: tl.constexpr, RANK_BLOCK: tl.constexpr,
                            HALF_N: tl.constexpr):
    """dx's low-rank term under dropout, dropout(dP·A), on the 2·HALF_N columns of K from
    ``first_col`` as the mask's two column halves (dropout.pair_columns: one hash per pair):
    (acc_lo, acc_hi, cols_lo, cols_hi, lo_ok, hi_ok). ``dp``: low_rank_rows of dP."""
    cols_lo, cols_hi = pair_columns(first_col, HALF_N)
    lo_ok = cols_lo < K
    hi_ok = cols_hi < K
    keep_lo, keep_hi = keep_pairs(seed, rows, cols_lo, p_drop)
    acc_lo = low_rank_product(dp, a_ptr, cols_lo, lo_ok, R, stride_ar, stride_ak, DOT_DTYPE,
                              PRECISION, RANK_BLOCK)
    acc_lo = acc_lo * tl.where(keep_lo, keep_scale, 0.0)  # NaN·0 = NaN
    acc_hi = low_rank_product(dp, a_ptr, cols_hi, hi_ok, R, stride_ar, stride_ak, DOT_DTYPE,
                              PRECISION, RANK_BLOCK)
    acc_hi = acc_hi * tl.where(keep_hi, keep_scale, 0.0)
    return acc_lo, acc_hi, cols_lo, cols_hi, lo_ok, hi_ok

