"""DoRA (lowrank_fused/dora.py): the magnitude's column scale c = m / ‖W + s·B_eff·A‖_row (an
fp32 N-vector, given) fused into the kernels of the plain operator.

Forward (P = dropout(x)·Aᵀ from forward.project first):
- no dropout: y = c ⊙ (x·Wᵀ + s·P·B_effᵀ) + bias, the plain K-extended GEMM with c in the
  epilogue; Z = x·Wᵀ + s·P·B_effᵀ (what dm needs) stored from the same accumulator when asked;
- dropout: y = x·Wᵀ + bias + (c − 1) ⊙ x̃·Wᵀ + c ⊙ s·P·B_effᵀ, x̃ = dropout(x). One K loop
  loads each W tile once and feeds two accumulators that both start from the low-rank term
  L = s·P·B_effᵀ: acc = x·Wᵀ + L and Z = x̃·Wᵀ + L, then y = acc + (c − 1) ⊙ Z + bias
  (= x·Wᵀ + (c − 1) ⊙ x̃·Wᵀ + c ⊙ L). x̃ comes from the P pass (forward.project_dropped), which
  draws the mask once per element of x and writes x̃ as it goes: a transient M x K read once
  more by the GEMM and dropped after it. Drawing the mask inside the GEMM's K loop instead
  would hash every element of x once per N tile (N / BLOCK_N times), an integer load that
  rivals the GEMM's own tensor-core time; one write and one read of x̃ cost ~2 passes over x.

Backward, G = dL/dy, G' = c ⊙ G applied to G's tiles as they are loaded (no M x N pass of its
own):
- one pass over G per row block: dP = s·G'·B_eff, and in the same read of G the partial sums
  of dB_eff = s·G'ᵀ·P, dbias = Σ_rows G and Σ_rows G ⊙ Z (dm before its division by ‖·‖, which
  the backend does on the N-vector); fp32 atomics, or when
  torch.are_deterministic_algorithms_enabled() a second, column-owning pass over G and Z;
- dx = G'·W + dP·A; with dropout dx = G·W + dropout(((c − 1) ⊙ G)·W + dP·A) (the reference's
  formula: PEFT's base term stays on x): one N loop loads G and W once into two accumulators,
  the mask applied to the second in the epilogue.
"""
import torch
import triton
import triton.language as tl

from .autotuner import launcher, m_bucket
from .configs import for_base, rank_block
from .precision import dot_precision, low_rank_dot_dtype
from . import accumulators
from .dropout import keep_tile, seed_arg
from .mma import mma, narrow
from .tiling import grouped_tile, matmul_tile, offsets_2d


@triton.jit
def _dora_linear_kernel(x_ptr, xd_ptr, w_ptr, bias_ptr, p_ptr, b_ptr, c_ptr, y_ptr, z_ptr, M,
                        M_BUCKET, N, K, R, scaling,
                        stride_xm, stride_xk, stride_wn, stride_wk, stride_bn, stride_br,
                        stride_bias,
                        HAS_BIAS: tl.constexpr, HAS_DROPOUT: tl.constexpr, NEED_Z: tl.constexpr,
                        PRECISION: tl.constexpr, DOT_DTYPE: tl.constexpr,
                        LR_PRECISION: tl.constexpr, RANK_BLOCK: tl.constexpr,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                        GROUP_M: tl.constexpr):
    pid_m, pid_n = grouped_tile(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)

    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < M
    col_ok = cols < N
    # The low-rank term s·P·B_effᵀ first (the r K-extension steps), as fused_linear does.
    ranks = tl.arange(0, RANK_BLOCK)
    p = tl.load(p_ptr + offsets_2d(rows, ranks, R, 1),
                mask=row_ok[:, None] & (ranks < R)[None, :], other=0.0)
    b_t = tl.load(b_ptr + offsets_2d(ranks, cols, stride_br, stride_bn),
                  mask=col_ok[None, :] & (ranks < R)[:, None], other=0.0)
    p = narrow(p.to(tl.float32) * scaling, DOT_DTYPE)
    acc = mma(p, narrow(b_t, DOT_DTYPE), tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32),
              LR_PRECISION)
    scale = tl.load(c_ptr + cols, mask=col_ok, other=0.0)
    if HAS_DROPOUT:
        # acc = x·Wᵀ + L and z = x̃·Wᵀ + L in one K loop, each W tile loaded once for both
        z = acc
        ks = tl.arange(0, BLOCK_K)
        x_ptrs = x_ptr + offsets_2d(rows, ks, stride_xm, stride_xk)
        xd_ptrs = xd_ptr + offsets_2d(rows, ks, K, 1)
        w_ptrs = w_ptr + offsets_2d(ks, cols, stride_wk, stride_wn)
        x_step = tl.full((), BLOCK_K, tl.int64) * stride_xk
        w_step = tl.full((), BLOCK_K, tl.int64) * stride_wk
        for k0 in range(0, K, BLOCK_K):
            k_ok = (k0 + ks) < K
            w = tl.load(w_ptrs, mask=k_ok[:, None] & col_ok[None, :], other=0.0)
            x = tl.load(x_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
            acc = mma(x, w, acc, PRECISION)
            x = tl.load(xd_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
            z = mma(x, w, z, PRECISION)
            x_ptrs += x_step
            xd_ptrs += BLOCK_K
            w_ptrs += w_step
    else:
        z = matmul_tile(acc, x_ptr, w_ptr, rows, cols, row_ok, col_ok, K, stride_xm, stride_xk,
                        stride_wk, stride_wn, PRECISION, BLOCK_K)
    out_mask = row_ok[:, None] & col_ok[None, :]
    # Z stored first, so y's tile can take its registers (no second tile live beside it)
    if NEED_Z:
        tl.store(z_ptr + offsets_2d(rows, cols, N, 1), narrow(z, z_ptr.dtype.element_ty),
                 mask=out_mask)
    if HAS_DROPOUT:
        out = acc + (scale - 1.0)[None, :] * z
    else:
        out = z * scale[None, :]
    if HAS_BIAS:
        bias = tl.load(bias_ptr + cols.to(tl.int64) * stride_bias, mask=col_ok, other=0.0)
        out += bias.to(tl.float32)[None, :]
    tl.store(y_ptr + offsets_2d(rows, cols, N, 1), narrow(out, y_ptr.dtype.element_ty),
             mask=out_mask)


@triton.jit
def _dora_grad_output_kernel(g_ptr, z_ptr, c_ptr, b_ptr, p_ptr, dp_ptr, db_ptr, dbias_ptr,
                             gz_ptr, M, M_BUCKET, N, R, scaling,
                             stride_gm, stride_gn, stride_zm, stride_zn, stride_bn, stride_br,
                             NEED_DP: tl.constexpr, NEED_DB: tl.constexpr,
                             NEED_DBIAS: tl.constexpr, NEED_DM: tl.constexpr,
                             DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
                             RANK_BLOCK: tl.constexpr, BLOCK_M: tl.constexpr,
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
    # dP alone: rows past M read row M - 1 again (their dP is never stored), as the plain pass
    # over G does; the column sums keep the row mask.
    ROWS_MASKED: tl.constexpr = NEED_DB or NEED_DBIAS or NEED_DM
    g_rows = rows if ROWS_MASKED else tl.minimum(rows, M - 1)
    g_ptrs = g_ptr + offsets_2d(g_rows, ns, stride_gm, stride_gn)
    z_ptrs = z_ptr + offsets_2d(rows, ns, stride_zm, stride_zn)
    b_ptrs = b_ptr + offsets_2d(ns, ranks, stride_bn, stride_br)
    g_step = tl.full((), BLOCK_N, tl.int64) * stride_gn
    z_step = tl.full((), BLOCK_N, tl.int64) * stride_zn
    b_step = tl.full((), BLOCK_N, tl.int64) * stride_bn
    for n0 in range(0, N, BLOCK_N):
        cols = n0 + ns
        col_ok = cols < N
        if ROWS_MASKED:
            g = tl.load(g_ptrs, mask=row_ok[:, None] & col_ok[None, :], other=0.0)
        else:
            g = tl.load(g_ptrs, mask=col_ok[None, :], other=0.0)
        g = g.to(tl.float32)
        # relaxed atomics: only the sums matter, nothing is ordered against them here
        if NEED_DBIAS:
            tl.atomic_add(dbias_ptr + cols, tl.sum(g, axis=0), mask=col_ok, sem="relaxed")
        if NEED_DM:
            z = tl.load(z_ptrs, mask=row_ok[:, None] & col_ok[None, :], other=0.0)
            tl.atomic_add(gz_ptr + cols, tl.sum(g * z.to(tl.float32), axis=0), mask=col_ok,
                          sem="relaxed")
        if NEED_DP or NEED_DB:
            scale = tl.load(c_ptr + cols, mask=col_ok, other=0.0)
            g_scaled = narrow(g * scale[None, :], DOT_DTYPE)  # G' = c ⊙ G, on load
            if NEED_DP:
                b = tl.load(b_ptrs, mask=col_ok[:, None] & rank_ok[None, :], other=0.0)
                gb = mma(g_scaled, narrow(b, DOT_DTYPE), gb, PRECISION)
            if NEED_DB:
                db = mma(tl.trans(g_scaled), p, tl.zeros((BLOCK_N, RANK_BLOCK), dtype=tl.float32),
                         PRECISION)
                tl.atomic_add(db_ptr + offsets_2d(cols, ranks, R, 1), db,
                              mask=col_ok[:, None] & rank_ok[None, :], sem="relaxed")
        g_ptrs += g_step
        z_ptrs += z_step
        b_ptrs += b_step
    if NEED_DP:
        tl.store(dp_ptr + offsets_2d(rows, ranks, R, 1), gb * scaling,
                 mask=row_ok[:, None] & rank_ok[None, :])


@triton.jit
def _dora_grad_b_kernel(g_ptr, z_ptr, c_ptr, p_ptr, db_ptr, dbias_ptr, gz_ptr, M, M_BUCKET, N, R,
                        scaling, stride_gm, stride_gn, stride_zm, stride_zn,
                        NEED_DB: tl.constexpr, NEED_DBIAS: tl.constexpr, NEED_DM: tl.constexpr,
                        DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
                        RANK_BLOCK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    # Deterministic dB_eff, dbias and Σ G ⊙ Z: each program owns BLOCK_N columns, walks all of M.
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < N
    ranks = tl.arange(0, RANK_BLOCK)
    rank_ok = ranks < R
    scale = tl.load(c_ptr + cols, mask=col_ok, other=0.0)
    db = tl.zeros((BLOCK_N, RANK_BLOCK), dtype=tl.float32)
    dbias = tl.zeros((BLOCK_N,), dtype=tl.float32)
    gz = tl.zeros((BLOCK_N,), dtype=tl.float32)
    ms = tl.arange(0, BLOCK_M)
    g_ptrs = g_ptr + offsets_2d(ms, cols, stride_gm, stride_gn)
    z_ptrs = z_ptr + offsets_2d(ms, cols, stride_zm, stride_zn)
    p_ptrs = p_ptr + offsets_2d(ms, ranks, R, 1)
    g_step = tl.full((), BLOCK_M, tl.int64) * stride_gm
    z_step = tl.full((), BLOCK_M, tl.int64) * stride_zm
    p_step = tl.full((), BLOCK_M, tl.int64) * R
    for m0 in range(0, M, BLOCK_M):
        row_ok = (m0 + ms) < M
        g = tl.load(g_ptrs, mask=row_ok[:, None] & col_ok[None, :], other=0.0).to(tl.float32)
        if NEED_DBIAS:
            dbias += tl.sum(g, axis=0)
        if NEED_DM:
            z = tl.load(z_ptrs, mask=row_ok[:, None] & col_ok[None, :], other=0.0)
            gz += tl.sum(g * z.to(tl.float32), axis=0)
        if NEED_DB:
            p = tl.load(p_ptrs, mask=row_ok[:, None] & rank_ok[None, :], other=0.0)
            db = mma(tl.trans(narrow(g * scale[None, :], DOT_DTYPE)), narrow(p, DOT_DTYPE), db,
                     PRECISION)
        g_ptrs += g_step
        z_ptrs += z_step
        p_ptrs += p_step
    if NEED_DB:
        tl.store(db_ptr + offsets_2d(cols, ranks, R, 1),
                 narrow(db * scaling, db_ptr.dtype.element_ty),
                 mask=col_ok[:, None] & rank_ok[None, :])
    if NEED_DBIAS:
        tl.store(dbias_ptr + cols, narrow(dbias, dbias_ptr.dtype.element_ty), mask=col_ok)
    if NEED_DM:
        tl.store(gz_ptr + cols, gz, mask=col_ok)


# seed not specialised: a seed that is 1 or a multiple of 16 would compile the kernel again.
@triton.jit(do_not_specialize=["seed"])
def _dora_grad_input_kernel(g_ptr, w_ptr, c_ptr, dp_ptr, a_ptr, dx_ptr, M, M_BUCKET, N, K, R,
                            stride_gm, stride_gn, stride_wn, stride_wk, stride_ar, stride_ak,
                            seed, p_drop, keep_scale,
                            HAS_DROPOUT: tl.constexpr, PRECISION: tl.constexpr,
                            DOT_DTYPE: tl.constexpr, LR_PRECISION: tl.constexpr,
                            RANK_BLOCK: tl.constexpr,
                            BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                            GROUP_M: tl.constexpr):
    # Output tile (BLOCK_M rows of M) x (BLOCK_N columns of K); the reduction runs over N in
    # BLOCK_K steps, after the r low-rank steps dP·A.
    pid_m, pid_k = grouped_tile(tl.program_id(0), M, K, BLOCK_M, BLOCK_N, GROUP_M)

    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_k * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < M
    col_ok = cols < K
    ranks = tl.arange(0, RANK_BLOCK)
    rank_ok = ranks < R
    dp = narrow(tl.load(dp_ptr + offsets_2d(rows, ranks, R, 1),
                        mask=row_ok[:, None] & rank_ok[None, :], other=0.0), DOT_DTYPE)
    a = narrow(tl.load(a_ptr + offsets_2d(ranks, cols, stride_ar, stride_ak),
                       mask=rank_ok[:, None] & col_ok[None, :], other=0.0), DOT_DTYPE)
    low = mma(dp, a, tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32), LR_PRECISION)
    ns = tl.arange(0, BLOCK_K)
    g_ptrs = g_ptr + offsets_2d(rows, ns, stride_gm, stride_gn)
    w_ptrs = w_ptr + offsets_2d(ns, cols, stride_wn, stride_wk)
    g_step = tl.full((), BLOCK_K, tl.int64) * stride_gn
    w_step = tl.full((), BLOCK_K, tl.int64) * stride_wn
    if HAS_DROPOUT:
        # dx = G·W + dropout(((c − 1) ⊙ G)·W + dP·A): G and W loaded once for both products
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for n0 in range(0, N, BLOCK_K):
            n_ok = (n0 + ns) < N
            g = tl.load(g_ptrs, mask=row_ok[:, None] & n_ok[None, :], other=0.0)
            w = tl.load(w_ptrs, mask=n_ok[:, None] & col_ok[None, :], other=0.0)
            scale = tl.load(c_ptr + n0 + ns, mask=n_ok, other=0.0)
            acc = mma(g, w, acc, PRECISION)
            g = narrow(g.to(tl.float32) * (scale - 1.0)[None, :], g_ptr.dtype.element_ty)
            low = mma(g, w, low, PRECISION)
            g_ptrs += g_step
            w_ptrs += w_step
        keep = keep_tile(seed, rows, cols, p_drop)
        acc += low * tl.where(keep, keep_scale, 0.0)  # NaN·0 = NaN
    else:
        # dx = (c ⊙ G)·W + dP·A, G scaled as it is loaded
        acc = low
        for n0 in range(0, N, BLOCK_K):
            n_ok = (n0 + ns) < N
            g = tl.load(g_ptrs, mask=row_ok[:, None] & n_ok[None, :], other=0.0)
            w = tl.load(w_ptrs, mask=n_ok[:, None] & col_ok[None, :], other=0.0)
            scale = tl.load(c_ptr + n0 + ns, mask=n_ok, other=0.0)
            g = narrow(g.to(tl.float32) * scale[None, :], g_ptr.dtype.element_ty)
            acc = mma(g, w, acc, PRECISION)
            g_ptrs += g_step
            w_ptrs += w_step
    tl.store(dx_ptr + offsets_2d(rows, cols, K, 1), narrow(acc, dx_ptr.dtype.element_ty),
             mask=row_ok[:, None] & col_ok[None, :])


def _gemm_family(dropout: bool, base_dtype, forward: bool) -> str:
    """Two fp32 accumulators per tile with dropout: the "gemm_dual" configs (configs.py); the
    forward without dropout "gemm_dora", dx without dropout the plain GEMM's."""
    if dropout:
        return for_base("gemm_dual", base_dtype)
    return for_base("gemm_dora" if forward else "gemm", base_dtype)


def dora_linear(x, weight, bias, p, lora_b_eff, scaling, scale, x_dropped=None,
                need_z=False):
    """(y, z): y by DoRA's rule (module docstring) in x's dtype, and z = x̃·Wᵀ + s·P·B_effᵀ in
    x's dtype when ``need_z``, else None. ``scale``: c, fp32 (N,); ``p``: dropout(x)·Aᵀ;
    ``x_dropped``: x̃ = dropout(x), contiguous, with dropout (forward.project_dropped), else
    None."""
    m, k = x.shape
    n = weight.shape[0]
    r = p.shape[1]
    y = torch.empty((m, n), dtype=x.dtype, device=x.device)
    z = torch.empty((m, n), dtype=x.dtype, device=x.device) if need_z else None
    if m == 0:
        return y, z
    dropout = x_dropped is not None
    dot_dtype = low_rank_dot_dtype(x.dtype, lora_b_eff.dtype)
    kernel, meta = launcher(_dora_linear_kernel, _gemm_family(dropout, x.dtype, True),
                            key=["M_BUCKET", "N", "K", "R", "HAS_BIAS", "HAS_DROPOUT", "NEED_Z",
                                 "PRECISION", "DOT_DTYPE", "LR_PRECISION", "RANK_BLOCK"])
    grid = lambda META: (triton.cdiv(m, META["BLOCK_M"]) * triton.cdiv(n, META["BLOCK_N"]),)  # noqa: E731
    kernel[grid](x, x_dropped if dropout else x, weight, bias if bias is not None else y, p,
                 lora_b_eff, scale, y, z if z is not None else y, m, m_bucket(m), n, k, r,
                 float(scaling), x.stride(0), x.stride(1), weight.stride(0), weight.stride(1),
                 lora_b_eff.stride(0), lora_b_eff.stride(1),
                 bias.stride(0) if bias is not None else 0, HAS_BIAS=bias is not None,
                 HAS_DROPOUT=dropout, NEED_Z=need_z, PRECISION=dot_precision(x.dtype),
                 DOT_DTYPE=dot_dtype, LR_PRECISION=dot_precision(dot_dtype),
                 RANK_BLOCK=rank_block(r), **meta)
    return y, z


def dora_grad_output_pass(grad_y, z, scale, lora_b_eff, p, scaling, *, need_dp, need_db,
                          need_dbias, need_gz, bias_dtype=None, deterministic=False):
    """(dP (M x r, fp32), dB_eff (N x r, B's dtype), dbias (N, bias_dtype), Σ_rows G ⊙ Z (N,
    fp32)) for G' = c ⊙ G (``scale``: c, fp32 (N,)); None where not asked for. One read of G
    (and of Z for the last) unless ``deterministic``, which adds a column-owning pass for the
    three column sums."""
    m, n = grad_y.shape
    r = lora_b_eff.shape[1]
    device = grad_y.device
    db_dtype, dbias_dtype = lora_b_eff.dtype, bias_dtype or grad_y.dtype
    fused = not deterministic
    dp = torch.empty((m, r), dtype=torch.float32, device=device) if need_dp else None
    if fused:  # atomics add into zeroed fp32 accumulators (kept between calls)
        db = accumulators.acquire((n, r), device, db_dtype) if need_db else None
        dbias = accumulators.acquire((n,), device, dbias_dtype) if need_dbias else None
        gz = accumulators.acquire((n,), device, torch.float32) if need_gz else None
    else:  # the column-owning kernel stores every element
        db = torch.empty((n, r), dtype=db_dtype, device=device) if need_db else None
        dbias = torch.empty((n,), dtype=dbias_dtype, device=device) if need_dbias else None
        gz = torch.empty((n,), dtype=torch.float32, device=device) if need_gz else None
    dot_dtype = low_rank_dot_dtype(grad_y.dtype, lora_b_eff.dtype)
    # Unused outputs point at a scratch word, never at an input: the autotuner zeroes
    # db_ptr, dbias_ptr and gz_ptr before each trial.
    scratch = torch.empty(1, dtype=torch.float32, device=device)
    z_arg = z if z is not None else grad_y
    if m and (need_dp or fused and (need_db or need_dbias or need_gz)):
        kernel, meta = launcher(_dora_grad_output_kernel,
                                for_base("grad_output_dora", grad_y.dtype),
                                key=["M_BUCKET", "N", "R", "NEED_DP", "NEED_DB", "NEED_DBIAS",
                                     "NEED_DM", "DOT_DTYPE", "PRECISION", "RANK_BLOCK"],
                                reset_to_zero=["db_ptr", "dbias_ptr", "gz_ptr"])
        grid = lambda META: (triton.cdiv(m, META["BLOCK_M"]),)  # noqa: E731
        kernel[grid](grad_y, z_arg, scale, lora_b_eff, p if p is not None else scratch,
                     dp if need_dp else scratch, db if db is not None else scratch,
                     dbias if dbias is not None else scratch, gz if gz is not None else scratch,
                     m, m_bucket(m), n, r, float(scaling), grad_y.stride(0), grad_y.stride(1),
                     z_arg.stride(0), z_arg.stride(1), lora_b_eff.stride(0),
                     lora_b_eff.stride(1), NEED_DP=need_dp, NEED_DB=need_db and fused,
                     NEED_DBIAS=need_dbias and fused, NEED_DM=need_gz and fused,
                     DOT_DTYPE=dot_dtype, PRECISION=dot_precision(dot_dtype),
                     RANK_BLOCK=rank_block(r), **meta)
    if deterministic and (need_db or need_dbias or need_gz):
        if m == 0:  # nothing to reduce: the stores never run
            for t in (db, dbias, gz):
                if t is not None:
                    t.zero_()
        else:
            kernel, meta = launcher(_dora_grad_b_kernel, for_base("skinny", grad_y.dtype), key=[
                "M_BUCKET", "N", "R", "NEED_DB", "NEED_DBIAS", "NEED_DM", "DOT_DTYPE",
                "PRECISION", "RANK_BLOCK"])
            grid = lambda META: (triton.cdiv(n, META["BLOCK_N"]),)  # noqa: E731
            kernel[grid](grad_y, z_arg, scale, p if p is not None else scratch,
                         db if db is not None else scratch,
                         dbias if dbias is not None else scratch,
                         gz if gz is not None else scratch, m, m_bucket(m), n, r,
                         float(scaling), grad_y.stride(0), grad_y.stride(1), z_arg.stride(0),
                         z_arg.stride(1), NEED_DB=need_db, NEED_DBIAS=need_dbias,
                         NEED_DM=need_gz, DOT_DTYPE=dot_dtype,
                         PRECISION=dot_precision(dot_dtype), RANK_BLOCK=rank_block(r), **meta)
    elif fused:
        db = accumulators.take(db, db_dtype) if db is not None else None
        dbias = accumulators.take(dbias, dbias_dtype) if dbias is not None else None
        gz = accumulators.take(gz, torch.float32) if gz is not None else None
    return dp, db, dbias, gz


def dora_grad_input(grad_y, weight, scale, dp, lora_a, seed=0, p_drop=0.0):
    """dx = (c ⊙ G)·W + dP·A, or with dropout G·W + dropout(((c − 1) ⊙ G)·W + dP·A); shape
    (M, K), in W's dtype. ``scale``: c, fp32 (N,)."""
    m, n = grad_y.shape
    k = weight.shape[1]
    r = lora_a.shape[0]
    dx = torch.empty((m, k), dtype=weight.dtype, device=grad_y.device)
    if m == 0:
        return dx
    dropout = p_drop > 0.0
    dot_dtype = low_rank_dot_dtype(weight.dtype, lora_a.dtype)
    kernel, meta = launcher(_dora_grad_input_kernel, _gemm_family(dropout, weight.dtype, False),
                            key=["M_BUCKET", "N", "K", "R", "HAS_DROPOUT", "PRECISION",
                                 "DOT_DTYPE", "LR_PRECISION", "RANK_BLOCK"])
    grid = lambda META: (triton.cdiv(m, META["BLOCK_M"]) * triton.cdiv(k, META["BLOCK_N"]),)  # noqa: E731
    kernel[grid](grad_y, weight, scale, dp, lora_a, dx, m, m_bucket(m), n, k, r,
                 grad_y.stride(0), grad_y.stride(1), weight.stride(0), weight.stride(1),
                 lora_a.stride(0), lora_a.stride(1), seed_arg(seed), p_drop,
                 1.0 / (1.0 - p_drop), HAS_DROPOUT=dropout,
                 PRECISION=dot_precision(weight.dtype), DOT_DTYPE=dot_dtype,
                 LR_PRECISION=dot_precision(dot_dtype), RANK_BLOCK=rank_block(r), **meta)
    return dx
