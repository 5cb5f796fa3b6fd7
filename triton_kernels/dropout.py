"""The dropout keep-mask, derived from (seed, row, column) alone so backward can regenerate it."""
import torch
import triton
import triton.language as tl


@triton.jit
def keep_mask(seed, rows, cols, n_cols, p_drop):
    """True where element (row, col) of an (M, n_cols) input survives dropout."""
    offsets = rows[:, None] * n_cols + cols[None, :]
    return tl.rand(seed, offsets) >= p_drop


@triton.jit
def _keep_mask_kernel(out_ptr, M, K, seed, p_drop, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    inside = (rows < M)[:, None] & (cols < K)[None, :]
    keep = keep_mask(seed, rows, cols, K, p_drop)
    tl.store(out_ptr + rows[:, None] * K + cols[None, :], keep.to(tl.int8), mask=inside)


def dropout_keep_mask(seed: int, p: float, shape, device) -> torch.Tensor:
    """The (M, K) boolean keep-mask the kernels use for ``seed`` and drop probability ``p``."""
    m, k = shape
    out = torch.empty((m, k), dtype=torch.int8, device=device)
    if out.numel():
        grid = (triton.cdiv(m, 32), triton.cdiv(k, 32))
        _keep_mask_kernel[grid](out, m, k, seed, p, BLOCK_M=32, BLOCK_K=32)
    return out.bool()
