"""The dropout keep-mask, derived from (seed, row, column) alone so backward can regenerate it.

The same bits as lowrank_fused/dropout.py's definition (read it there), in uint32 arithmetic.
Columns c and c + 16 of each aligned 32-column group share one hash, so a kernel covers a mask
tile as two column halves (``pair_columns``): one hash per (row, pair), its low 16 bits deciding
the low column and its high 16 bits the high one. ``p_drop`` should already be quantised to a
multiple of 2^-16 (the backends pass ``DropoutSpec.quantised_p``), which float32 holds exactly.
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
def pair_columns(first_col, HALF: tl.constexpr):
    """(cols_lo, cols_hi), HALF columns each, of the 2·HALF-wide tile starting at ``first_col``
    (a multiple of 32; HALF a multiple of 16): cols_hi = cols_lo + 16, the columns sharing a hash.
    cols_lo runs in 16-column contiguous chunks (Triton sees it), so loads through it vectorise."""
    i = tl.arange(0, HALF)
    cols_lo = first_col + (i // 16) * 32 + (i % 16)
    return cols_lo, cols_lo + 16


@triton.jit
def keep_pairs(seed, rows, cols_lo, p_drop):
    """(keep_lo, keep_hi): True where (row, col) of ``cols_lo`` and of ``cols_lo + 16`` survive
    dropout, from one hash per pair."""
    s = seed.to(tl.uint32)
    row_key = _mix(rows.to(tl.uint32) ^ _mix(s))
    c = cols_lo.to(tl.uint32)
    col_key = (((c >> 5) << 4) | (c & 15)) * 0x9E3779B9 + _mix(s ^ 0x9E3779B9)
    h = _tail(row_key[:, None] ^ col_key[None, :])
    t = tl.minimum(p_drop * 65536.0 + 0.5, 65535.0).to(tl.uint32)
    return (h & 0xFFFF) >= t, (h >> 16) >= t


@triton.jit
def keep_tile(seed, rows, cols, p_drop):
    """True where (row, col) survive dropout, for a tile of any columns in their own order (an
    epilogue's output tile): column c takes its bits from the hash of its pair, the high half
    where c has bit 4 set. One hash per element, twice ``keep_pairs``' count: for code that
    runs once per output tile, not in a streamed loop. (keep_pairs' column key is the same for
    c and c + 16 when bit 4 of c is clear, so ``cols`` may be passed as they are.)"""
    keep_lo, keep_hi = keep_pairs(seed, rows, cols, p_drop)
    return tl.where(((cols & 16) != 0)[None, :], keep_hi, keep_lo)


def seed_arg(seed: int) -> int:
    """The seed as the kernels take it: its low 32 bits (all the mask uses: keep_pairs casts to
    uint32) as a signed 32-bit int. Every seed then passes as an i32, and with the kernels'
    do_not_specialize=["seed"] no seed value (a multiple of 16, 1, >= 2**31) compiles again."""
    low = int(seed) & 0xFFFFFFFF
    return low - (1 << 32) if low >= (1 << 31) else low


# do_not_specialize: a seed that is 1 or a multiple of 16 would otherwise compile a new kernel.
@triton.jit(do_not_specialize=["seed"])
def _keep_mask_kernel(out_ptr, M, K, seed, p_drop, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols_lo, cols_hi = pair_columns(tl.program_id(1) * BLOCK_K, BLOCK_K // 2)
    keep_lo, keep_hi = keep_pairs(seed, rows, cols_lo, p_drop)
    row_off = rows[:, None].to(tl.int64) * K
    tl.store(out_ptr + row_off + cols_lo[None, :], keep_lo.to(tl.int8),
             mask=(rows < M)[:, None] & (cols_lo < K)[None, :])
    tl.store(out_ptr + row_off + cols_hi[None, :], keep_hi.to(tl.int8),
             mask=(rows < M)[:, None] & (cols_hi < K)[None, :])


def dropout_keep_mask(seed: int, p: float, shape, device) -> torch.Tensor:
    """The (M, K) boolean keep-mask the kernels use for ``seed`` and (quantised) drop
    probability ``p``."""
    m, k = shape
    out = torch.empty((m, k), dtype=torch.int8, device=device)
    if out.numel():
        grid = (triton.cdiv(m, 32), triton.cdiv(k, 32))
        _keep_mask_kernel[grid](out, m, k, seed_arg(seed), p, BLOCK_M=32, BLOCK_K=32)
    return out.bool()
