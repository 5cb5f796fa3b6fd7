"""Backward of y = x·Wᵀ + bias + s·P·B_effᵀ, P = x̃·Aᵀ, x̃ = dropout(x), G = dL/dy (M x N):

- one pass over G per row block gives dP = s·G·B_eff (M x r), and, in the same read of G, the
  partial sums of dB_eff = s·Gᵀ·P and of dbias (fp32 atomics, or a second, deterministic pass
  over G when torch.are_deterministic_algorithms_enabled()); with DoRA's column scale c too
  (dora.py: G' = c ⊙ G feeds dP and dB_eff, and Σ_rows G ⊙ Z gives dm);
- dx = G·W + dropout(dP·A): the dx GEMM with the low-rank term as r extra steps of its K loop;
- dA = dPᵀ·dropout(x) (LoRA only: the one place x is needed).

W is frozen (no dW). LoRA-XS (B_eff = B·Rᵀ) takes dR = dB_effᵀ·B from dB_eff in the backend.
"""
import torch
import triton
import triton.language as tl

from . import accumulators, persistent, variants
from .autotuner import launcher, m_bucket
from .configs import for_base, rank_block
from .dropout import keep_pairs, pair_columns, seed_arg
from .low_rank import dropped_low_rank_halves, low_rank_product, low_rank_rows
from .mma import mma, narrow
from .precision import dot_precision, low_rank_dot_dtype
from .tiling import (grouped_tile, matmul_tile, matmul_tile_halves, offsets_2d, store_tile,
                     stream, tile_span)


# The pass over G, one read of G per row block. The plain operator is DoRA's with c = 1: with its
# column scale c (SCALED), y = c ⊙ Z + bias, Z = x·Wᵀ + s·P·B_effᵀ (with dropout y = x·Wᵀ + bias
# + (c − 1) ⊙ x̃·Wᵀ + c ⊙ s·P·B_effᵀ, Z = x̃·Wᵀ + s·P·B_effᵀ). With G' = c ⊙ G:
#   dL/dP     = s·G'·B_eff     (M x r)   stored per row block
#   dL/dB_eff = s·G'ᵀ·P        (N x r)   per-row-block partial sums, fp32 atomics
#   dL/dbias  = Σ_rows G       (N)
#   dL/dc     = Σ_rows G ⊙ Z   (N)       NEED_DM; dm = dL/dc / ‖W + s·B_eff·A‖_row (the backend)
@triton.jit
def _grad_output_pass_kernel(g_ptr, z_ptr, c_ptr, b_ptr, p_ptr, dp_ptr, db_ptr, dbias_ptr,
                             gz_ptr, M, M_BUCKET, N, R, scaling,
                             stride_gm, stride_gn, stride_zm, stride_zn, stride_bn, stride_br,
                             SCALED: tl.constexpr, NEED_DP: tl.constexpr, NEED_DB: tl.constexpr,
                             NEED_DBIAS: tl.constexpr, NEED_DM: tl.constexpr,
                             DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
                             RANK_BLOCK: tl.constexpr, BLOCK_M: tl.constexpr,
                             BLOCK_N: tl.constexpr):
    rows, row_ok = tile_span(tl.program_id(0), BLOCK_M, M)
    ranks = tl.arange(0, RANK_BLOCK)
    rank_ok = ranks < R
    gb = tl.zeros((BLOCK_M, RANK_BLOCK), dtype=tl.float32)
    if NEED_DB:
        p = low_rank_rows(p_ptr, rows, row_ok, R, scaling, DOT_DTYPE, RANK_BLOCK)
    ns = tl.arange(0, BLOCK_N)
    # dP alone (deterministic mode, LoRA-XS with B frozen): rows past M read row M - 1 again
    # instead of a row mask, as their dP is never stored. One predicate fewer in the loop, where
    # ptxas spilled row_ok (sm_80, 4-warp 64x64 at r = 64); the column sums keep the mask.
    ROWS_MASKED: tl.constexpr = NEED_DB or NEED_DBIAS or NEED_DM
    g_rows = rows if ROWS_MASKED else tl.minimum(rows, M - 1)
    g_ptrs, g_step = stream(g_ptr, g_rows, ns, stride_gm, stride_gn, stride_gn, BLOCK_N)
    z_ptrs, z_step = stream(z_ptr, rows, ns, stride_zm, stride_zn, stride_zn, BLOCK_N)
    b_ptrs, b_step = stream(b_ptr, ns, ranks, stride_bn, stride_br, stride_bn, BLOCK_N)
    for n0 in range(0, N, BLOCK_N):
        cols = n0 + ns
        col_ok = cols < N
        if ROWS_MASKED:
            g = tl.load(g_ptrs, mask=row_ok[:, None] & col_ok[None, :], other=0.0)
        else:
            g = tl.load(g_ptrs, mask=col_ok[None, :], other=0.0)
        if SCALED:  # held in fp32 for the sums and the scaling
            g = g.to(tl.float32)
        # relaxed atomics: only the sums matter, nothing is ordered against them here
        if NEED_DBIAS:
            tl.atomic_add(dbias_ptr + cols, tl.sum(g.to(tl.float32), axis=0), mask=col_ok,
                          sem="relaxed")
        if NEED_DM:
            z = tl.load(z_ptrs, mask=row_ok[:, None] & col_ok[None, :], other=0.0)
            tl.atomic_add(gz_ptr + cols, tl.sum(g * z.to(tl.float32), axis=0), mask=col_ok,
                          sem="relaxed")
            z_ptrs += z_step
        if NEED_DP or NEED_DB:
            if SCALED:  # G' = c ⊙ G, on load
                g = g * tl.load(c_ptr + cols, mask=col_ok, other=0.0)[None, :]
            g = narrow(g, DOT_DTYPE)
            if NEED_DP:
                b = tl.load(b_ptrs, mask=col_ok[:, None] & rank_ok[None, :], other=0.0)
                gb = mma(g, narrow(b, DOT_DTYPE), gb, PRECISION)
            if NEED_DB:
                db = mma(tl.trans(g), p, tl.zeros((BLOCK_N, RANK_BLOCK), dtype=tl.float32),
                         PRECISION)
                tl.atomic_add(db_ptr + offsets_2d(cols, ranks, R, 1), db,
                              mask=col_ok[:, None] & rank_ok[None, :], sem="relaxed")
        g_ptrs += g_step
        b_ptrs += b_step
    if NEED_DP:
        tl.store(dp_ptr + offsets_2d(rows, ranks, R, 1), gb * scaling,
                 mask=row_ok[:, None] & rank_ok[None, :])


# Deterministic dB_eff, dbias and Σ_rows G ⊙ Z (the pass over G's sums without atomics): each
# program owns BLOCK_N rows of dB (columns of G) and walks all of M.
@triton.jit
def _grad_b_kernel(g_ptr, z_ptr, c_ptr, p_ptr, db_ptr, dbias_ptr, gz_ptr, M, M_BUCKET, N, R,
                   scaling, stride_gm, stride_gn, stride_zm, stride_zn,
                   SCALED: tl.constexpr, NEED_DB: tl.constexpr, NEED_DBIAS: tl.constexpr,
                   NEED_DM: tl.constexpr, DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
                   RANK_BLOCK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    cols, col_ok = tile_span(tl.program_id(0), BLOCK_N, N)
    ranks = tl.arange(0, RANK_BLOCK)
    rank_ok = ranks < R
    if SCALED:
        scale = tl.load(c_ptr + cols, mask=col_ok, other=0.0)
    db = tl.zeros((BLOCK_N, RANK_BLOCK), dtype=tl.float32)
    dbias = tl.zeros((BLOCK_N,), dtype=tl.float32)
    gz = tl.zeros((BLOCK_N,), dtype=tl.float32)
    ms = tl.arange(0, BLOCK_M)
    g_ptrs, g_step = stream(g_ptr, ms, cols, stride_gm, stride_gn, stride_gm, BLOCK_M)
    z_ptrs, z_step = stream(z_ptr, ms, cols, stride_zm, stride_zn, stride_zm, BLOCK_M)
    p_ptrs, p_step = stream(p_ptr, ms, ranks, R, 1, R, BLOCK_M)
    for m0 in range(0, M, BLOCK_M):
        row_ok = (m0 + ms) < M
        g = tl.load(g_ptrs, mask=row_ok[:, None] & col_ok[None, :], other=0.0)
        if SCALED:
            g = g.to(tl.float32)
        if NEED_DBIAS:
            dbias += tl.sum(g.to(tl.float32), axis=0)
        if NEED_DM:
            z = tl.load(z_ptrs, mask=row_ok[:, None] & col_ok[None, :], other=0.0)
            gz += tl.sum(g * z.to(tl.float32), axis=0)
            z_ptrs += z_step
        if NEED_DB:
            p = tl.load(p_ptrs, mask=row_ok[:, None] & rank_ok[None, :], other=0.0)
            if SCALED:
                g = g * scale[None, :]
            db = mma(tl.trans(narrow(g, DOT_DTYPE)), narrow(p, DOT_DTYPE), db, PRECISION)
        g_ptrs += g_step
        p_ptrs += p_step
    if NEED_DB:
        tl.store(db_ptr + offsets_2d(cols, ranks, R, 1),
                 narrow(db * scaling, db_ptr.dtype.element_ty),
                 mask=col_ok[:, None] & rank_ok[None, :])
    if NEED_DBIAS:
        tl.store(dbias_ptr + cols, narrow(dbias, dbias_ptr.dtype.element_ty), mask=col_ok)
    if NEED_DM:
        tl.store(gz_ptr + cols, gz, mask=col_ok)


# dx: x enters y through x·Wᵀ and through P = x̃·Aᵀ, x̃ = x ⊙ keep / (1 − p):
#   dL/dx = G·W + (dL/dP·A) ⊙ keep / (1 − p)  = [G | dP]·[W ; A] without dropout
# The low-rank steps first (low_rank.py), then G·W on the same accumulator; with dropout the tile
# is the mask's two column halves (dropout.pair_columns), each masked before G·W continues it.
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
    # BLOCK_K steps, after the r low-rank steps.
    pid_m, pid_k = grouped_tile(tl.program_id(0), M, K, BLOCK_M, BLOCK_N, GROUP_M)
    rows, row_ok = tile_span(pid_m, BLOCK_M, M)
    # The low-rank term first, into the accumulator the G·W loop then continues: dP and A are
    # dead before that loop (and with dropout no second tile waits beside the accumulator).
    dp = low_rank_rows(dp_ptr, rows, row_ok, R, 1.0, DOT_DTYPE, RANK_BLOCK)
    if HAS_DROPOUT:
        acc_lo, acc_hi, cols_lo, cols_hi, lo_ok, hi_ok = dropped_low_rank_halves(
            dp, a_ptr, rows, pid_k * BLOCK_N, K, R, stride_ar, stride_ak, seed, p_drop, keep_scale,
            DOT_DTYPE, LR_PRECISION, RANK_BLOCK, BLOCK_N // 2)
        acc_lo, acc_hi = matmul_tile_halves(acc_lo, acc_hi, g_ptr, w_ptr, rows, cols_lo, cols_hi,
                                            row_ok, lo_ok, hi_ok, N, stride_gm, stride_gn,
                                            stride_wn, stride_wk, PRECISION, BLOCK_K)
        store_tile(dx_ptr, acc_lo, rows, cols_lo, row_ok, lo_ok, K)
        store_tile(dx_ptr, acc_hi, rows, cols_hi, row_ok, hi_ok, K)
    else:
        cols, col_ok = tile_span(pid_k, BLOCK_N, K)
        acc = low_rank_product(dp, a_ptr, cols, col_ok, R, stride_ar, stride_ak, DOT_DTYPE,
                               LR_PRECISION, RANK_BLOCK)
        acc = matmul_tile(acc, g_ptr, w_ptr, rows, cols, row_ok, col_ok, N, stride_gm, stride_gn,
                          stride_wn, stride_wk, PRECISION, BLOCK_K)
        store_tile(dx_ptr, acc, rows, cols, row_ok, col_ok, K)


# dA: P = x̃·Aᵀ, so dL/dA = dPᵀ·x̃ (r x K), the keep-mask drawn again from (seed, row, column).
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
    return column_scaled_grad_output_pass(
        grad_y, None, None, lora_b_eff, p, scaling, need_dp=need_dp, need_db=need_db,
        need_dbias=need_dbias, need_gz=False, bias_dtype=bias_dtype,
        deterministic=deterministic)[:3]


def column_scaled_grad_output_pass(grad_y, z, scale, lora_b_eff, p, scaling, *, need_dp, need_db,
                                   need_dbias, need_gz, bias_dtype=None, deterministic=False):
    """``grad_output_pass`` with DoRA's column scale c (``scale``: fp32 (N,), or None) applied to
    G where it feeds dP and dB_eff, and Σ_rows G ⊙ Z (N, fp32) when ``need_gz``: (dP, dB_eff,
    dbias, Σ G ⊙ Z), None where not asked for. ``deterministic`` adds a column-owning pass over
    G (and Z) for the column sums instead of atomics."""
    m, n = grad_y.shape
    r = lora_b_eff.shape[1]
    device = grad_y.device
    db_dtype, dbias_dtype = lora_b_eff.dtype, bias_dtype or grad_y.dtype
    fused = not deterministic
    if fused:  # atomics add into zeroed fp32 accumulators (kept between calls)
        def output(shape, dtype):
            return accumulators.acquire(shape, device, dtype)
    else:  # _grad_b_kernel stores every element, in the output dtype
        def output(shape, dtype):
            return torch.empty(shape, dtype=dtype, device=device)
    dp = torch.empty((m, r), dtype=torch.float32, device=device) if need_dp else None
    db = output((n, r), db_dtype) if need_db else None
    dbias = output((n,), dbias_dtype) if need_dbias else None
    gz = output((n,), torch.float32) if need_gz else None
    dot_dtype = low_rank_dot_dtype(grad_y.dtype, lora_b_eff.dtype)
    # Unused operands point at a scratch word, never at an input: the autotuner zeroes
    # db_ptr, dbias_ptr and gz_ptr before each trial.
    scratch = torch.empty(1, dtype=torch.float32, device=device)
    given = lambda t: t if t is not None else scratch  # noqa: E731
    z_arg = z if z is not None else grad_y
    shared = dict(SCALED=scale is not None, DOT_DTYPE=dot_dtype,
                  PRECISION=dot_precision(dot_dtype), RANK_BLOCK=rank_block(r))
    if m and (need_dp or fused and (need_db or need_dbias or need_gz)):
        family = "grad_output" if scale is None else "grad_output_dora"
        kernel, meta = launcher(_grad_output_pass_kernel, for_base(family, grad_y.dtype),
                                key=["M_BUCKET", "N", "R", "SCALED", "NEED_DP", "NEED_DB",
                                     "NEED_DBIAS", "NEED_DM", "DOT_DTYPE", "PRECISION",
                                     "RANK_BLOCK"],
                                reset_to_zero=["db_ptr", "dbias_ptr", "gz_ptr"])
        grid = lambda META: (triton.cdiv(m, META["BLOCK_M"]),)  # noqa: E731
        kernel[grid](grad_y, z_arg, given(scale), lora_b_eff, given(p), given(dp), given(db),
                     given(dbias), given(gz), m, m_bucket(m), n, r, float(scaling),
                     grad_y.stride(0), grad_y.stride(1), z_arg.stride(0), z_arg.stride(1),
                     lora_b_eff.stride(0), lora_b_eff.stride(1), NEED_DP=need_dp,
                     NEED_DB=need_db and fused, NEED_DBIAS=need_dbias and fused,
                     NEED_DM=need_gz and fused, **shared, **meta)
    if deterministic and (need_db or need_dbias or need_gz):
        if m == 0:  # nothing to reduce: the stores never run
            for t in (db, dbias, gz):
                if t is not None:
                    t.zero_()
        else:
            kernel, meta = launcher(_grad_b_kernel, for_base("skinny", grad_y.dtype), key=[
                "M_BUCKET", "N", "R", "SCALED", "NEED_DB", "NEED_DBIAS", "NEED_DM", "DOT_DTYPE",
                "PRECISION", "RANK_BLOCK"])
            grid = lambda META: (triton.cdiv(n, META["BLOCK_N"]),)  # noqa: E731
            kernel[grid](grad_y, z_arg, given(scale), given(p), given(db), given(dbias),
                         given(gz), m, m_bucket(m), n, r, float(scaling), grad_y.stride(0),
                         grad_y.stride(1), z_arg.stride(0), z_arg.stride(1), NEED_DB=need_db,
                         NEED_DBIAS=need_dbias, NEED_DM=need_gz, **shared, **meta)
    elif fused:
        db = accumulators.take(db, db_dtype) if db is not None else None
        dbias = accumulators.take(dbias, dbias_dtype) if dbias is not None else None
        gz = accumulators.take(gz, torch.float32) if gz is not None else None
    return dp, db, dbias, gz


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
