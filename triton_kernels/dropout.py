"""The dropout keep-mask, derived from (seed, row, column) alone so backward can regenerate it.

The same bits as lowrank_fused/dropout.py's definition (read it there), in uint32 arithmetic.
``p_drop`` should already be quantised to a multiple of 2^-24 (the backends pass
``DropoutSpec.quantised_p``), which float32 holds exactly.
"""
import torch
import triton
import triton.language as tl


@triton.jit
def _tail(x):
    x = x * 0x7FEB352D
    x = x ^ (x >> 15)
    x = x * 0x846CA68B
    return x ^ (x >> 16)


@triton.jit
def _mix(x):
    return _tail(x ^ (x >> 16))


@triton.jit
def keep_mask(seed, rows, cols, n_cols, p_drop):
    """True where element (row, col) of an (M, n_cols) input survives dropout."""
    s = seed.to(tl.uint32)
    row_key = _mix(rows.to(tl.uint32) ^ _mix(s))
    col_key = _mix(cols.to(tl.uint32) ^ _mix(s ^ 0x9E3779B9))
    t = tl.minimum(p_drop * 16777216.0 + 0.5, 16777215.0).to(tl.uint32)
    return _tail(row_key[:, None] ^ col_key[None, :]) >= (t << 8)


@triton.jit
def _keep_mask_kernel(out_ptr, M, K, seed, p_drop, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    inside = (rows < M)[:, None] & (cols < K)[None, :]
    keep = keep_mask(seed, rows, cols, K, p_drop)
    tl.store(out_ptr + rows[:, None].to(tl.int64) * K + cols[None, :], keep.to(tl.int8),
             mask=inside)


def dropout_keep_mask(seed: int, p: float, shape, device) -> torch.Tensor:
    """The (M, K) boolean keep-mask the kernels use for ``seed`` and (quantised) drop
    probability ``p``."""
    m, k = shape
    out = torch.empty((m, k), dtype=torch.int8, device=device)
    if out.numel():
        grid = (triton.cdiv(m, 32), triton.cdiv(k, 32))
        _keep_mask_kernel[grid](out, m, k, seed, p, BLOCK_M=32, BLOCK_K=32)
    return out.bool()
