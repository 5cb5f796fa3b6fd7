"""Tile order shared by the GEMM kernels."""
import triton
import triton.language as tl


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
