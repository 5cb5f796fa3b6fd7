"""Tile order and the main-GEMM loop shared by the forward and dx kernels."""
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
def matmul_tile(a_ptr, b_ptr, rows, cols, row_ok, col_ok, depth, stride_am, stride_ak,
                stride_bk, stride_bn, PRECISION: tl.constexpr, BLOCK_M: tl.constexpr,
                BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """fp32 (BLOCK_M, BLOCK_N) tile of a·b over the reduction dimension ``depth``, both operands
    addressed through strides (so b may be a transposed view)."""
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, depth, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        a = tl.load(a_ptr + rows[:, None] * stride_am + ks[None, :] * stride_ak,
                    mask=row_ok[:, None] & (ks < depth)[None, :], other=0.0)
        b = tl.load(b_ptr + ks[:, None] * stride_bk + cols[None, :] * stride_bn,
                    mask=(ks < depth)[:, None] & col_ok[None, :], other=0.0)
        acc = mma(a, b, acc, PRECISION)
    return acc
