"""Backward, G = dL/dy (M x N):

- one pass over G per row block gives dP = s·G·B_eff (M x r), and, in the same read of G, the
  partial sums of dB_eff = s·Gᵀ·P and of dbias (fp32 atomics, or a second, deterministic pass
  over G when torch.are_deterministic_algorithms_enabled());
- dx = G·W + dropout(dP·A): the dx GEMM with the low-rank term as r extra steps of its K loop;
- dA = dPᵀ·dropout(x) (LoRA only: the one place x is needed).
"""
import torch
import triton
import triton.language as tl

from . import accumulators, persistent, variants
from .autotuner import launcher, m_bucket
from .configs import for_base, rank_block
from .precision import dot_precision, low_rank_dot_dtype
from .dropout import keep_pairs, pair_columns, seed_arg
from .mma import mma, narrow
from .tiling import grouped_tile, matmul_tile, matmul_tile_halves, offsets_2d


@triton.jit
def _grad_output_pass_kernel(g_ptr, b_ptr, p_ptr, dp_ptr, db_ptr, dbias_ptr, M, M_BUCKET, N, R,
                             scaling,
                             stride_gm, stride_gn, stride_bn, stride_br,
                             NEED_DP: tl.constexpr, NEED_DB: tl.constexpr,
                             NEED_DBIAS: tl.constexpr, DOT_DTYPE: tl.constexpr,
                             PRECISION: tl.constexpr, RANK_BLOCK: tl.constexpr,
                             BLOCK_M: tl.constexpr,
                             BLOCK_N: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < M
    ranks = tl.arange(0, RANK_BLOCK)
    rank_ok = ranks < R
    gb = tl.zeros((BLOCK_M, RANK_BLOCK), dtype=tl.float32)
    if NEED_DB:
        p = tl.load(p_ptr + offsets_2d(rows, ranks, R, 1),
                    mask=row_ok[:, None] & rank_ok[None, :], other=0.0)
        p = narrow(p.to(tl.float32) * scaling, DOT_DTYPE)
    ns = tl.arange(0, BLOCK_N)
    # dP alone (deterministic mode, LoRA-XS with B frozen): rows past M read row M - 1 again
    # instead of a row mask, as their dP is never stored. One predicate fewer in the loop, where
    # ptxas spilled row_ok (sm_80, 4-warp 64x64 at r = 64); dB and dbias keep the mask.
    ROWS_MASKED: tl.constexpr = NEED_DB or NEED_DBIAS
    g_rows = rows if ROWS_MASKED else tl.minimum(rows, M - 1)
    g_ptrs = g_ptr + offsets_2d(g_rows, ns, stride_gm, stride_gn)
    b_ptrs = b_ptr + offsets_2d(ns, ranks, stride_bn, stride_br)
    g_step = tl.full((), BLOCK_N, tl.int64) * stride_gn
    b_step = tl.full((), BLOCK_N, tl.int64) * stride_bn
    for n0 in range(0, N, BLOCK_N):
        cols = n0 + ns
        col_ok = cols < N
        if ROWS_MASKED:
            g = tl.load(g_ptrs, mask=row_ok[:, None] & col_ok[None, :], other=0.0)
        else:
            g = tl.load(g_ptrs, mask=col_ok[None, :], other=0.0)
        if NEED_DBIAS:
            # relaxed: only the sums matter, nothing is ordered against them in this kernel
            tl.atomic_add(dbias_ptr + cols, tl.sum(g.to(tl.float32), axis=0), mask=col_ok,
                          sem="relaxed")
        g = narrow(g, DOT_DTYPE)
        if NEED_DP:
            b = tl.load(b_ptrs, mask=col_ok[:, None] & rank_ok[None, :], other=0.0)
            gb = mma(g, narrow(b, DOT_DTYPE), gb, PRECISION)
        if NEED_DB:
            db = mma(tl.trans(g), p, tl.zeros((BLOCK_N, RANK_BLOCK), dtype=tl.float32), PRECISION)
            tl.atomic_add(db_ptr + offsets_2d(cols, ranks, R, 1), db,
                          mask=col_ok[:, None] & rank_ok[None, :], sem="relaxed")
        g_ptrs += g_step
        b_ptrs += b_step
    if NEED_DP:
        tl.store(dp_ptr + offsets_2d(rows, ranks, R, 1), gb * scaling,
                 mask=row_ok[:, None] & rank_ok[None, :])


@triton.jit
def _grad_b_kernel(g_ptr, p_ptr, db_ptr, dbias_ptr, M, M_BUCKET, N, R, scaling, stride_gm,
                   stride_gn,
                   NEED_DB: tl.constexpr, NEED_DBIAS: tl.constexpr, DOT_DTYPE: tl.constexpr,
                   PRECISION: tl.constexpr,
                   RANK_BLOCK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    # Deterministic dB_eff and dbias: each program owns BLOCK_N rows of dB and walks all of M.
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < N
    ranks = tl.arange(0, RANK_BLOCK)
    rank_ok = ranks < R
    db = tl.zeros((BLOCK_N, RANK_BLOCK), dtype=tl.float32)
    dbias = tl.zeros((BLOCK_N,), dtype=tl.float32)
    ms = tl.arange(0, BLOCK_M)
    g_ptrs = g_ptr + offsets_2d(ms, cols, stride_gm, stride_gn)
    p_ptrs = p_ptr + offsets_2d(ms, ranks, R, 1)
    g_step = tl.full((), BLOCK_M, tl.int64) * stride_gm
    p_step = tl.full((), BLOCK_M, tl.int64) * R
    for m0 in range(0, M, BLOCK_M):
        row_ok = (m0 + ms) < M
        g = tl.load(g_ptrs, mask=row_ok[:, None] & col_ok[None, :], other=0.0)
        if NEED_DBIAS:
            dbias += tl.sum(g.to(tl.float32), axis=0)
        if NEED_DB:
            p = tl.load(p_ptrs, mask=row_ok[:, None] & rank_ok[None, :], other=0.0)
            db = mma(tl.trans(narrow(g, DOT_DTYPE)), narrow(p, DOT_DTYPE), db, PRECISION)
        g_ptrs += g_step
        p_ptrs += p_step
    if NEED_DB:
        tl.store(db_ptr + offsets_2d(cols, ranks, R, 1),
                 narrow(db * scaling, db_ptr.dtype.element_ty),
                 mask=col_ok[:, None] & rank_ok[None, :])
    if NEED_DBIAS:
        tl.store(dbias_ptr + cols, narrow(dbias, dbias_ptr.dtype.element_ty), mask=col_ok)


# seed not specialised: a seed that is 1 or a multiple of 16 would compile the kernel again.
@triton.jit(do_not_specialize=["seed"])
def _grad_input_kernel(g_ptr, w_ptr, dp_ptr, a_ptr, dx_ptr, M, M_BUCKET, N, K, R,
                       stride_gm, stride_gn, stride_wn, stride_wk, stride_ar, stride_ak,
                       seed, p_drop, keep_scale,
                       HAS_DROPOUT: tl.constexpr, PRECISION: tl.constexpr,
                       DOT_DTYPE: tl.constexpr, LR_PRECISION: tl.constexpr,
                       RANK_BLOCK: tl.constexpr,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                       GROUP_M: tl.constexpr):
    # Output tile (BLOCK_M rows of M) x (BLOCK_N columns of K); the reduction runs over N in
    # BLOCK_K steps, then over r.
    pid_m, pid_k = grouped_tile(tl.program_id(0), M, K, BLOCK_M, BLOCK_N, GROUP_M)

    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < M
    ranks = tl.arange(0, RANK_BLOCK)
    rank_ok = ranks < R
    # The low-rank term first, into the accumulator the G·W loop then continues: dP and A are
    # dead before that loop (and with dropout no second tile waits beside the accumulator).
    dp = narrow(tl.load(dp_ptr + offsets_2d(rows, ranks, R, 1),
                        mask=row_ok[:, None] & rank_ok[None, :], other=0.0), DOT_DTYPE)
    if HAS_DROPOUT:
        # The tile as the mask's two column halves (one hash per pair of elements).
        HALF_N: tl.constexpr = BLOCK_N // 2
        cols_lo, cols_hi = pair_columns(pid_k * BLOCK_N, HALF_N)
        lo_ok = cols_lo < K
        hi_ok = cols_hi < K
        keep_lo, keep_hi = keep_pairs(seed, rows, cols_lo, p_drop)
        a = narrow(tl.load(a_ptr + offsets_2d(ranks, cols_lo, stride_ar, stride_ak),
                           mask=rank_ok[:, None] & lo_ok[None, :], other=0.0), DOT_DTYPE)
        acc_lo = mma(dp, a, tl.zeros((BLOCK_M, HALF_N), dtype=tl.float32), LR_PRECISION)
        acc_lo = acc_lo * tl.where(keep_lo, keep_scale, 0.0)  # NaN·0 = NaN
        a = narrow(tl.load(a_ptr + offsets_2d(ranks, cols_hi, stride_ar, stride_ak),
                           mask=rank_ok[:, None] & hi_ok[None, :], other=0.0), DOT_DTYPE)
        acc_hi = mma(dp, a, tl.zeros((BLOCK_M, HALF_N), dtype=tl.float32), LR_PRECISION)
        acc_hi = acc_hi * tl.where(keep_hi, keep_scale, 0.0)
        acc_lo, acc_hi = matmul_tile_halves(acc_lo, acc_hi, g_ptr, w_ptr, rows, cols_lo, cols_hi,
                                            row_ok, lo_ok, hi_ok, N, stride_gm, stride_gn,
                                            stride_wn, stride_wk, PRECISION, BLOCK_K)
        tl.store(dx_ptr + offsets_2d(rows, cols_lo, K, 1), narrow(acc_lo, dx_ptr.dtype.element_ty),
                 mask=row_ok[:, None] & lo_ok[None, :])
        tl.store(dx_ptr + offsets_2d(rows, cols_hi, K, 1), narrow(acc_hi, dx_ptr.dtype.element_ty),
                 mask=row_ok[:, None] & hi_ok[None, :])
    else:
        cols = pid_k * BLOCK_N + tl.arange(0, BLOCK_N)
        col_ok = cols < K
        a = narrow(tl.load(a_ptr + offsets_2d(ranks, cols, stride_ar, stride_ak),
                           mask=rank_ok[:, None] & col_ok[None, :], other=0.0), DOT_DTYPE)
        acc = mma(dp, a, tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32), LR_PRECISION)
        acc = matmul_tile(acc, g_ptr, w_ptr, rows, cols, row_ok, col_ok, N, stride_gm, stride_gn,
                          stride_wn, stride_wk, PRECISION, BLOCK_K)  # [dP | G]·[A ; W]
        tl.store(dx_ptr + offsets_2d(rows, cols, K, 1), narrow(acc, dx_ptr.dtype.element_ty),
                 mask=row_ok[:, None] & col_ok[None, :])


# seed not specialised: a seed that is 1 or a multiple of 16 would compile the kernel again.
@triton.jit(do_not_specialize=["seed"])
def _grad_a_kernel(dp_ptr, x_ptr, partial_ptr, M, M_BUCKET, K, R, rows_per_split, stride_xm,
                   stride_xk,
                   seed, p_drop, keep_scale, HAS_DROPOUT: tl.constexpr, DOT_DTYPE: tl.constexpr,
                   PRECISION: tl.constexpr, RANK_BLOCK: tl.constexpr, BLOCK_M: tl.constexpr,
                   BLOCK_N: tl.constexpr):
    # Program (column block, split) sums dPᵀ·dropout(x) over its split's rows_per_split rows
    # into its own fp32 partial; the launcher adds the partials (no atomics: deterministic).
    split = tl.program_id(1)
    first_row = split * rows_per_split
    end_row = tl.minimum(first_row + rows_per_split, M)
    ranks = tl.arange(0, RANK_BLOCK)
    rank_ok = ranks < R
    ms = first_row + tl.arange(0, BLOCK_M)
    dp_ptrs = dp_ptr + offsets_2d(ms, ranks, R, 1)
    dp_step = tl.full((), BLOCK_M, tl.int64) * R
    x_step = tl.full((), BLOCK_M, tl.int64) * stride_xm
    partial = partial_ptr + split.to(tl.int64) * R * K
    if HAS_DROPOUT:
        # The column block as the mask's two halves (one hash per pair of elements).
        HALF_N: tl.constexpr = BLOCK_N // 2
        cols_lo, cols_hi = pair_columns(tl.program_id(0) * BLOCK_N, HALF_N)
        lo_ok = cols_lo < K
        hi_ok = cols_hi < K
        acc_lo = tl.zeros((RANK_BLOCK, HALF_N), dtype=tl.float32)
        acc_hi = tl.zeros((RANK_BLOCK, HALF_N), dtype=tl.float32)
        x_lo = x_ptr + offsets_2d(ms, cols_lo, stride_xm, stride_xk)
        x_hi = x_ptr + offsets_2d(ms, cols_hi, stride_xm, stride_xk)
        for m0 in range(first_row, end_row, BLOCK_M):
            rows = m0 + tl.arange(0, BLOCK_M)
            row_ok = rows < end_row
            dp = tl.load(dp_ptrs, mask=row_ok[:, None] & rank_ok[None, :], other=0.0)
            dp_t = tl.trans(narrow(dp, DOT_DTYPE))
            keep_lo, keep_hi = keep_pairs(seed, rows, cols_lo, p_drop)
            x = tl.load(x_lo, mask=row_ok[:, None] & lo_ok[None, :], other=0.0)
            x = x.to(tl.float32) * tl.where(keep_lo, keep_scale, 0.0)  # NaN·0 = NaN
            acc_lo = mma(dp_t, narrow(x, DOT_DTYPE), acc_lo, PRECISION)
            x = tl.load(x_hi, mask=row_ok[:, None] & hi_ok[None, :], other=0.0)
            x = x.to(tl.float32) * tl.where(keep_hi, keep_scale, 0.0)
            acc_hi = mma(dp_t, narrow(x, DOT_DTYPE), acc_hi, PRECISION)
            dp_ptrs += dp_step
            x_lo += x_step
            x_hi += x_step
        tl.store(partial + offsets_2d(ranks, cols_lo, K, 1), acc_lo,
                 mask=rank_ok[:, None] & lo_ok[None, :])
        tl.store(partial + offsets_2d(ranks, cols_hi, K, 1), acc_hi,
                 mask=rank_ok[:, None] & hi_ok[None, :])
    else:
        cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        col_ok = cols < K
        acc = tl.zeros((RANK_BLOCK, BLOCK_N), dtype=tl.float32)
        x_ptrs = x_ptr + offsets_2d(ms, cols, stride_xm, stride_xk)
        for m0 in range(first_row, end_row, BLOCK_M):
            row_ok = (m0 + tl.arange(0, BLOCK_M)) < end_row
            dp = tl.load(dp_ptrs, mask=row_ok[:, None] & rank_ok[None, :], other=0.0)
            x = tl.load(x_ptrs, mask=row_ok[:, None] & col_ok[None, :], other=0.0)
            acc = mma(tl.trans(narrow(dp, DOT_DTYPE)), narrow(x, DOT_DTYPE), acc, PRECISION)
            dp_ptrs += dp_step
            x_ptrs += x_step
        tl.store(partial + offsets_2d(ranks, cols, K, 1), acc,
                 mask=rank_ok[:, None] & col_ok[None, :])


def grad_output_pass(grad_y, lora_b_eff, p, scaling, *, need_dp, need_db, need_dbias,
                     bias_dtype=None, deterministic=False):
    """(dP (M x r, fp32), dB_eff (N x r, B's dtype), dbias (N, bias_dtype)); None where not
    asked for. One read of G unless ``deterministic``, which adds a pass over G for dB and dbias."""
    m, n = grad_y.shape
    r = lora_b_eff.shape[1]
    device = grad_y.device
    db_dtype, dbias_dtype = lora_b_eff.dtype, bias_dtype or grad_y.dtype
    fused_reductions = not deterministic
    dp = torch.empty((m, r), dtype=torch.float32, device=device) if need_dp else None
    if fused_reductions:  # atomics add into zeroed fp32 accumulators (kept between calls)
        db = accumulators.acquire((n, r), device, db_dtype) if need_db else None
        dbias = accumulators.acquire((n,), device, dbias_dtype) if need_dbias else None
    else:  # _grad_b_kernel stores every element, in the output dtype
        db = torch.empty((n, r), dtype=db_dtype, device=device) if need_db else None
        dbias = torch.empty((n,), dtype=dbias_dtype, device=device) if need_dbias else None
    dot_dtype = low_rank_dot_dtype(grad_y.dtype, lora_b_eff.dtype)
    # Unused outputs point at a scratch word, never at an input: the autotuner zeroes
    # db_ptr and dbias_ptr before each trial.
    scratch = torch.empty(1, dtype=torch.float32, device=device)
    if m and (need_dp or fused_reductions and (need_db or need_dbias)):
        kernel, meta = launcher(_grad_output_pass_kernel, for_base("grad_output", grad_y.dtype),
                                key=["M_BUCKET", "N", "R", "NEED_DP", "NEED_DB", "NEED_DBIAS",
                                     "DOT_DTYPE", "PRECISION", "RANK_BLOCK"],
                                reset_to_zero=["db_ptr", "dbias_ptr"])
        grid = lambda META: (triton.cdiv(m, META["BLOCK_M"]),)  # noqa: E731
        kernel[grid](grad_y, lora_b_eff, p if p is not None else scratch,
                     dp if need_dp else scratch, db if db is not None else scratch,
                     dbias if dbias is not None else scratch,
                     m, m_bucket(m), n, r, float(scaling), grad_y.stride(0), grad_y.stride(1),
                     lora_b_eff.stride(0), lora_b_eff.stride(1),
                     NEED_DP=need_dp, NEED_DB=need_db and fused_reductions,
                     NEED_DBIAS=need_dbias and fused_reductions, DOT_DTYPE=dot_dtype,
                     PRECISION=dot_precision(dot_dtype), RANK_BLOCK=rank_block(r), **meta)
    if deterministic and (need_db or need_dbias):
        if m == 0:  # nothing to reduce: the stores never run
            for t in (db, dbias):
                if t is not None:
                    t.zero_()
        else:
            kernel, meta = launcher(_grad_b_kernel, for_base("skinny", grad_y.dtype), key=[
                "M_BUCKET", "N", "R", "NEED_DB", "NEED_DBIAS", "DOT_DTYPE", "PRECISION",
                "RANK_BLOCK"])
            grid = lambda META: (triton.cdiv(n, META["BLOCK_N"]),)  # noqa: E731
            kernel[grid](grad_y, p if p is not None else scratch,
                         db if db is not None else scratch,
                         dbias if dbias is not None else scratch, m, m_bucket(m), n, r,
                         float(scaling), grad_y.stride(0), grad_y.stride(1), NEED_DB=need_db,
                         NEED_DBIAS=need_dbias, DOT_DTYPE=dot_dtype,
                         PRECISION=dot_precision(dot_dtype), RANK_BLOCK=rank_block(r), **meta)
    elif fused_reductions:
        db = accumulators.take(db, db_dtype) if db is not None else None
        dbias = accumulators.take(dbias, dbias_dtype) if dbias is not None else None
    return dp, db, dbias


def grad_input(grad_y, weight, dp, lora_a, seed=0, p_drop=0.0, variant=None):
    """dx = G·W + dropout(dP·A), shape (M, K), in W's dtype. ``variant`` (without dropout):
    "tiled" (the kernel above), "tma" (persistent.py's) or "auto"; None: the environment's
    (variants.py)."""
    m, n = grad_y.shape
    k = weight.shape[1]
    r = lora_a.shape[0]
    dx = torch.empty((m, k), dtype=weight.dtype, device=grad_y.device)
    if m == 0:
        return dx
    if p_drop == 0.0 and variants.use_tma("grad_input", (grad_y, weight, dx), variant, lambda v:
                                          grad_input(grad_y, weight, dp, lora_a, variant=v),
                                          key=(triton.next_power_of_2(m), n, k, r,
                                               lora_a.dtype)):
        return persistent.grad_input(grad_y, weight, dp, lora_a, dx)
    dot_dtype = low_rank_dot_dtype(weight.dtype, lora_a.dtype)
    kernel, meta = launcher(_grad_input_kernel, for_base("gemm", weight.dtype), key=[
        "M_BUCKET", "N", "K", "R", "HAS_DROPOUT", "PRECISION", "DOT_DTYPE", "LR_PRECISION",
        "RANK_BLOCK"])
    grid = lambda META: (triton.cdiv(m, META["BLOCK_M"]) * triton.cdiv(k, META["BLOCK_N"]),)  # noqa: E731
    kernel[grid](grad_y, weight, dp, lora_a, dx, m, m_bucket(m), n, k, r, grad_y.stride(0),
                 grad_y.stride(1), weight.stride(0), weight.stride(1),
                 lora_a.stride(0), lora_a.stride(1), seed_arg(seed), p_drop, 1.0 / (1.0 - p_drop),
                 HAS_DROPOUT=p_drop > 0.0, PRECISION=dot_precision(weight.dtype),
                 DOT_DTYPE=dot_dtype, LR_PRECISION=dot_precision(dot_dtype),
                 RANK_BLOCK=rank_block(r), **meta)
    return dx


def _row_splits(m: int, k: int, device: torch.device):
    """(splits, rows_per_split) of dA's reduction over M: enough programs for two per SM even
    when K has few column blocks, in 128-row steps (a multiple of every BLOCK_M)."""
    sms = torch.cuda.get_device_properties(device).multi_processor_count \
        if device.type == "cuda" else 4
    column_blocks = triton.cdiv(k, 128)
    splits = max(1, min(triton.cdiv(2 * sms, column_blocks), triton.cdiv(m, 128)))
    rows_per_split = triton.cdiv(triton.cdiv(m, splits), 128) * 128
    return triton.cdiv(m, rows_per_split), rows_per_split


def grad_a(dp, x, lora_a_dtype, seed=0, p_drop=0.0):
    """dA = dPᵀ·dropout(x), shape (r, K), in ``lora_a_dtype``; split over M so a few columns
    still fill the GPU, the splits' fp32 partials added in a fixed order (deterministic)."""
    m, k = x.shape
    r = dp.shape[1]
    if m == 0:
        return torch.zeros((r, k), dtype=lora_a_dtype, device=x.device)
    splits, rows_per_split = _row_splits(m, k, x.device)
    partials = torch.empty((splits, r, k), dtype=torch.float32, device=x.device)
    dot_dtype = low_rank_dot_dtype(x.dtype, lora_a_dtype)
    kernel, meta = launcher(_grad_a_kernel, for_base("skinny", x.dtype), key=[
        "M_BUCKET", "K", "R", "HAS_DROPOUT", "DOT_DTYPE", "PRECISION", "RANK_BLOCK"])
    grid = lambda META: (triton.cdiv(k, META["BLOCK_N"]), splits)  # noqa: E731
    kernel[grid](dp, x, partials, m, m_bucket(m), k, r, rows_per_split, x.stride(0),
                 x.stride(1), seed_arg(seed), p_drop, 1.0 / (1.0 - p_drop),
                 HAS_DROPOUT=p_drop > 0.0, DOT_DTYPE=dot_dtype,
                 PRECISION=dot_precision(dot_dtype), RANK_BLOCK=rank_block(r), **meta)
    return partials.sum(0, dtype=torch.float32).to(lora_a_dtype)
