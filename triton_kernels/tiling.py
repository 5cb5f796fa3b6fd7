"""Tile order, tile addressing and the main-GEMM loop shared by the forward and dx kernels."""
import triton
import triton.language as tl

from .mma import mma


@triton.jit
def grouped_tile(pid, rows, cols, BLOCK_ROWS: tl.constexpr, BLOCK_COLS: tl.constexpr,
                 GROUP_M: tl.constexpr):
    """(row block, column block) of program ``pid``: GROUP_M row blocks share each column block
    while it sits in L2."""
    grid_m = tl.cdiv(rows, BLOCK_ROWS)
    grid_n = tl.cdiv(cols, BLOCK_COLS)
    group = pid // (GROUP_M * grid_n)
    first_m = group * GROUP_M
    group_size = tl.minimum(grid_m - first_m, GROUP_M)
    return first_m + (pid % group_size), (pid % (GROUP_M * grid_n)) // group_size


@triton.jit
def offsets_2d(rows, cols, stride_rows, stride_cols):
    """Element offsets (int64) of the tile rows x cols: row·stride passes 2^31 on large inputs,
    and 64-bit offsets cost little since the pointers they feed are 64-bit anyway."""
    return (rows.to(tl.int64)[:, None] * stride_rows
            + cols.to(tl.int64)[None, :] * stride_cols)


@triton.jit
def matmul_tile(acc, a_ptr, b_ptr, rows, cols, row_ok, col_ok, depth, stride_am, stride_ak,
                stride_bk, stride_bn, PRECISION: tl.constexpr, BLOCK_K: tl.constexpr):
    """acc + the fp32 tile a[rows, :]·b[:, cols] over the reduction dimension ``depth``, both
    operands addressed through strides (so b may be a transposed view). Callers start acc with
    their low-rank term, so nothing but the accumulator is live across the loop."""
    ks = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + offsets_2d(rows, ks, stride_am, stride_ak)
    b_ptrs = b_ptr + offsets_2d(ks, cols, stride_bk, stride_bn)
    # the pointers advance by a 64-bit step, so the loop adds no index arithmetic
    a_step = tl.full((), BLOCK_K, tl.int64) * stride_ak
    b_step = tl.full((), BLOCK_K, tl.int64) * stride_bk
    for k0 in range(0, depth, BLOCK_K):
        k_ok = (k0 + ks) < depth
        a = tl.load(a_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        b = tl.load(b_ptrs, mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        acc = mma(a, b, acc, PRECISION)
        a_ptrs += a_step
        b_ptrs += b_step
    return acc


@triton.jit
def matmul_tile_halves(acc_lo, acc_hi, a_ptr, b_ptr, rows, cols_lo, cols_hi, row_ok, lo_ok,
                       hi_ok, depth, stride_am, stride_ak, stride_bk, stride_bn,
                       PRECISION: tl.constexpr, BLOCK_K: tl.constexpr):
    """``matmul_tile`` over two column sets at once (one read of a per step): the two halves of
    a dropout-mask tile (triton_kernels/dropout.py's pair_columns), each with its accumulator."""
    ks = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + offsets_2d(rows, ks, stride_am, stride_ak)
    b_lo_ptrs = b_ptr + offsets_2d(ks, cols_lo, stride_bk, stride_bn)
    b_hi_ptrs = b_ptr + offsets_2d(ks, cols_hi, stride_bk, stride_bn)
    a_step = tl.full((), BLOCK_K, tl.int64) * stride_ak
    b_step = tl.full((), BLOCK_K, tl.int64) * stride_bk
    for k0 in range(0, depth, BLOCK_K):
        k_ok = (k0 + ks) < depth
        a = tl.load(a_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        b_lo = tl.load(b_lo_ptrs, mask=k_ok[:, None] & lo_ok[None, :], other=0.0)
        b_hi = tl.load(b_hi_ptrs, mask=k_ok[:, None] & hi_ok[None, :], other=0.0)
        acc_lo = mma(a, b_lo, acc_lo, PRECISION)
        acc_hi = mma(a, b_hi, acc_hi, PRECISION)
        a_ptrs += a_step
        b_lo_ptrs += b_step
        b_hi_ptrs += b_step
    return acc_lo, acc_hi
