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
- one pass over G per row block (backward.py's, with the column scale): dP = s·G'·B_eff, and in
  the same read of G the partial sums of dB_eff = s·G'ᵀ·P, dbias = Σ_rows G and Σ_rows G ⊙ Z
  (dm before its division by ‖·‖, which the backend does on the N-vector); fp32 atomics, or
  when torch.are_deterministic_algorithms_enabled() a second, column-owning pass over G and Z;
- dx = G'·W + dP·A; with dropout dx = G·W + dropout(((c − 1) ⊙ G)·W + dP·A) (the reference's
  formula: PEFT's base term stays on x): one N loop loads G and W once into two accumulators,
  the mask applied to the second in the epilogue.
"""
import torch
import triton
import triton.language as tl

from .autotuner import launcher, m_bucket
from .backward import column_scaled_grad_output_pass
from .configs import for_base, rank_block
from .dropout import keep_tile, seed_arg
from .low_rank import low_rank_tile
from .mma import mma, narrow
from .precision import dot_precision, low_rank_dot_dtype
from .tiling import (add_bias, grouped_tile, matmul_tile, matmul_tile_pair, store_tile, stream,
                     tile_span)


# DoRA's forward (module docstring), L = s·P·B_effᵀ first as in forward._fused_linear_kernel:
#   no dropout  Z = x·Wᵀ + L,  y = c ⊙ Z + bias
#   dropout     Z = x̃·Wᵀ + L,  y = (x·Wᵀ + L) + (c − 1) ⊙ Z + bias
# Z (what dm needs, backward.py) is stored from the same accumulators when NEED_Z.
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
    rows, row_ok = tile_span(pid_m, BLOCK_M, M)
    cols, col_ok = tile_span(pid_n, BLOCK_N, N)
    acc = low_rank_tile(p_ptr, b_ptr, rows, cols, row_ok, col_ok, R, scaling, stride_br,
                        stride_bn, DOT_DTYPE, LR_PRECISION, RANK_BLOCK)
    scale = tl.load(c_ptr + cols, mask=col_ok, other=0.0)
    if HAS_DROPOUT:
        # acc = x·Wᵀ + L and z = x̃·Wᵀ + L in one K loop, each W tile loaded once for both
        acc, z = matmul_tile_pair(acc, acc, x_ptr, xd_ptr, w_ptr, rows, cols, row_ok, col_ok, K,
                                  stride_xm, stride_xk, K, stride_wk, stride_wn, PRECISION,
                                  BLOCK_K)
    else:
        z = matmul_tile(acc, x_ptr, w_ptr, rows, cols, row_ok, col_ok, K, stride_xm, stride_xk,
                        stride_wk, stride_wn, PRECISION, BLOCK_K)
    # Z stored first, so y's tile can take its registers (no second tile live beside it)
    if NEED_Z:
        store_tile(z_ptr, z, rows, cols, row_ok, col_ok, N)
    if HAS_DROPOUT:
        out = acc + (scale - 1.0)[None, :] * z
    else:
        out = z * scale[None, :]
    if HAS_BIAS:
        out = add_bias(out, bias_ptr, cols, col_ok, stride_bias)
    store_tile(y_ptr, out, rows, cols, row_ok, col_ok, N)


# DoRA's dx, dP = s·(c ⊙ G)·B_eff from the pass over G (backward.py):
#   no dropout, y = c ⊙ (x·Wᵀ + s·x·Aᵀ·B_effᵀ) + bias:
#     dL/dx = (c ⊙ G)·W + dP·A
#   dropout, y = x·Wᵀ + bias + (c − 1) ⊙ x̃·Wᵀ + c ⊙ s·x̃·Aᵀ·B_effᵀ, x̃ = x ⊙ keep / (1 − p):
#     dL/dx = G·W + (((c − 1) ⊙ G)·W + dP·A) ⊙ keep / (1 − p)
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
    rows, row_ok = tile_span(pid_m, BLOCK_M, M)
    cols, col_ok = tile_span(pid_k, BLOCK_N, K)
    low = low_rank_tile(dp_ptr, a_ptr, rows, cols, row_ok, col_ok, R, 1.0, stride_ar, stride_ak,
                        DOT_DTYPE, LR_PRECISION, RANK_BLOCK)
    ns = tl.arange(0, BLOCK_K)
    g_ptrs, g_step = stream(g_ptr, rows, ns, stride_gm, stride_gn, stride_gn, BLOCK_K)
    w_ptrs, w_step = stream(w_ptr, ns, cols, stride_wn, stride_wk, stride_wn, BLOCK_K)
    # With dropout G·W apart, the rest into the low-rank term's accumulator; else all in one.
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32) if HAS_DROPOUT else low
    for n0 in range(0, N, BLOCK_K):
        n_ok = (n0 + ns) < N
        g = tl.load(g_ptrs, mask=row_ok[:, None] & n_ok[None, :], other=0.0)
        w = tl.load(w_ptrs, mask=n_ok[:, None] & col_ok[None, :], other=0.0)
        scale = tl.load(c_ptr + n0 + ns, mask=n_ok, other=0.0)
        if HAS_DROPOUT:  # G and W loaded once for G·W and ((c − 1) ⊙ G)·W
            acc = mma(g, w, acc, PRECISION)
            g = narrow(g.to(tl.float32) * (scale - 1.0)[None, :], g_ptr.dtype.element_ty)
            low = mma(g, w, low, PRECISION)
        else:  # (c ⊙ G)·W, G scaled as it is loaded
            g = narrow(g.to(tl.float32) * scale[None, :], g_ptr.dtype.element_ty)
            acc = mma(g, w, acc, PRECISION)
        g_ptrs += g_step
        w_ptrs += w_step
    if HAS_DROPOUT:
        keep = keep_tile(seed, rows, cols, p_drop)
        acc += low * tl.where(keep, keep_scale, 0.0)  # NaN·0 = NaN
    store_tile(dx_ptr, acc, rows, cols, row_ok, col_ok, K)


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
    three column sums. The plain pass over G (backward.py) with the column scale."""
    return column_scaled_grad_output_pass(
        grad_y, z, scale, lora_b_eff, p, scaling, need_dp=need_dp, need_db=need_db,
        need_dbias=need_dbias, need_gz=need_gz, bias_dtype=bias_dtype,
        deterministic=deterministic)


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
