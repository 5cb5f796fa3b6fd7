"""Tile order, tile addressing, the main-GEMM loops and the GEMM epilogue pieces shared by every
tiled kernel (forward, dx, DoRA's, the 4-bit ones) and the persistent ones."""
import triton
import triton.language as tl

from .mma import mma, narrow


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
def tile_span(block, BLOCK: tl.constexpr, limit):
    """(indices, in bounds) of block ``block`` (BLOCK wide) of a dimension ``limit`` long."""
    indices = block * BLOCK + tl.arange(0, BLOCK)
    return indices, indices < limit


@triton.jit
def offsets_2d(rows, cols, stride_rows, stride_cols):
    """Element offsets (int64) of the tile rows x cols: row·stride passes 2^31 on large inputs,
    and 64-bit offsets cost little since the pointers they feed are 64-bit anyway."""
    return (rows.to(tl.int64)[:, None] * stride_rows
            + cols.to(tl.int64)[None, :] * stride_cols)


@triton.jit
def stream(ptr, rows, cols, stride_rows, stride_cols, stride_step, STEP: tl.constexpr):
    """(pointers to the first tile rows x cols, the 64-bit step to the next): a loop that
    advances its pointers by that step adds no index arithmetic per iteration."""
    return (ptr + offsets_2d(rows, cols, stride_rows, stride_cols),
            tl.full((), STEP, tl.int64) * stride_step)


@triton.jit
def matmul_tile(acc, a_ptr, b_ptr, rows, cols, row_ok, col_ok, depth, stride_am, stride_ak,
                stride_bk, stride_bn, PRECISION: tl.constexpr, BLOCK_K: tl.constexpr):
    """acc + the fp32 tile a[rows, :]·b[:, cols] over the reduction dimension ``depth``, both
    operands addressed through strides (so b may be a transposed view). Callers start acc with
    their low-rank term, so nothing but the accumulator is live across the loop."""
    ks = tl.arange(0, BLOCK_K)
    a_ptrs, a_step = stream(a_ptr, rows, ks, stride_am, stride_ak, stride_ak, BLOCK_K)
    b_ptrs, b_step = stream(b_ptr, ks, cols, stride_bk, stride_bn, stride_bk, BLOCK_K)
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
    a_ptrs, a_step = stream(a_ptr, rows, ks, stride_am, stride_ak, stride_ak, BLOCK_K)
    b_lo_ptrs, b_step = stream(b_ptr, ks, cols_lo, stride_bk, stride_bn, stride_bk, BLOCK_K)
    b_hi_ptrs = b_ptr + offsets_2d(ks, cols_hi, stride_bk, stride_bn)
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


@triton.jit
def add_bias(acc, bias_ptr, cols, col_ok, stride_bias):
    """acc + bias[cols] broadcast over the tile's rows (the GEMMs' epilogue)."""
    bias = tl.load(bias_ptr + cols.to(tl.int64) * stride_bias, mask=col_ok, other=0.0)
    return acc + bias.to(tl.float32)[None, :]


@triton.jit
def store_tile(ptr, tile, rows, cols, row_ok, col_ok, stride_rows):
    """Stores the fp32 ``tile`` at [rows, cols] of the contiguous matrix at ``ptr`` (row stride
    ``stride_rows``), rounded to its dtype."""
    tl.store(ptr + offsets_2d(rows, cols, stride_rows, 1), narrow(tile, ptr.dtype.element_ty),
             mask=row_ok[:, None] & col_ok[None, :])


@triton.jit
def matmul_tile_pair(acc, acc2, a_ptr, a2_ptr, b_ptr, rows, cols, row_ok, col_ok, depth,
                     stride_am, stride_ak, stride_a2m, stride_bk, stride_bn,
                     PRECISION: tl.constexpr, BLOCK_K: tl.constexpr):
    """(acc + a[rows, :]·b[:, cols], acc2 + a2[rows, :]·b[:, cols]) in one loop, each b tile
    loaded once for both (a2 contiguous along the reduction, row stride ``stride_a2m``)."""
    ks = tl.arange(0, BLOCK_K)
    a_ptrs, a_step = stream(a_ptr, rows, ks, stride_am, stride_ak, stride_ak, BLOCK_K)
    a2_ptrs = a2_ptr + offsets_2d(rows, ks, stride_a2m, 1)
    b_ptrs, b_step = stream(b_ptr, ks, cols, stride_bk, stride_bn, stride_bk, BLOCK_K)
    for k0 in range(0, depth, BLOCK_K):
        k_ok = (k0 + ks) < depth
        b = tl.load(b_ptrs, mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        a = tl.load(a_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        acc = mma(a, b, acc, PRECISION)
        a = tl.load(a2_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        acc2 = mma(a, b, acc2, PRECISION)
        a_ptrs += a_step
        a2_ptrs += BLOCK_K
        b_ptrs += b_step
    return acc, acc2
