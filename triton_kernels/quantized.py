"""A 4-bit base (bitsandbytes NF4 / FP4, ``lowrank_fused.quantized.Packed4bit``): the GEMMs that
touch W dequantize it tile by tile inside their K loops, from the packed bytes, the 16-entry code
table and the block absmax (nested: its second level too), so the dense W never exists in memory.

- ``fused_linear_4bit``: y = x·Wᵀ + bias + s·P·B_effᵀ, the low-rank term first in the accumulator
  the K loop then continues (as forward.py's fused_linear);
- ``grad_input_4bit``: dx = G·W + dropout(dP·A) (as backward.py's grad_input);
- ``dequantize_4bit``: the dense W, for tests (bit-equal to bitsandbytes' dequantize_4bit).

Element i = n·K + k of the flattened W is nibble ``i % 2`` (0: high) of byte ``i // 2``; its block
is ``i // blocksize``, so a block may span rows: then (odd K, K not a multiple of the blocksize)
every element is addressed by its flat index. Where K is a multiple of the blocksize and a tile
lies in one block ("aligned"), a tile reads one byte per two elements and one absmax per W row.
Value = code[q]·absmax[block] in fp32, rounded to the quant state's dtype, then to the dot's
dtype: the same roundings as bitsandbytes' dequantize_4bit followed by ``.to(x.dtype)``. A nested
absmax is code2[absmax_q]·absmax2[block // blocksize2] + offset, rounded after the product and
after the sum as bitsandbytes does: those kernels compile with fused multiply-add off.
"""
import torch
import triton
import triton.language as tl

from .autotuner import launcher, m_bucket
from .configs import for_base, rank_block
from .dropout import seed_arg
from .low_rank import dropped_low_rank_halves, low_rank_product, low_rank_rows, low_rank_tile
from .mma import mma, narrow
from .precision import dot_precision, low_rank_dot_dtype
from .tiling import add_bias, grouped_tile, store_tile, stream, tile_span

_TL = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32,
       torch.float64: tl.float32}  # an fp64 state dequantizes to the same fp32 value


@triton.jit
def _scale_of(block, ok, absmax_ptr, code2_ptr, absmax2_ptr, offset_ptr,
              BLOCKSIZE2: tl.constexpr, NESTED: tl.constexpr):
    """absmax[block] in fp32 (nested: its second-level dequantization); 0 where not ``ok``."""
    if NESTED:
        scale_q = tl.load(absmax_ptr + block, mask=ok, other=0).to(tl.int32)
        scale = (tl.load(code2_ptr + scale_q, eviction_policy="evict_last")
                 * tl.load(absmax2_ptr + block // BLOCKSIZE2, mask=ok, other=0.0,
                           eviction_policy="evict_last"))
        scale = tl.where(ok, scale + tl.load(offset_ptr), 0.0)
    else:
        scale = tl.load(absmax_ptr + block, mask=ok, other=0.0, eviction_policy="evict_last")
    return scale


@triton.jit
def _finish(v, ok, STATE_DTYPE: tl.constexpr, OUT_DTYPE: tl.constexpr):
    """fp32 values rounded to the quant state's dtype (bitsandbytes' output), then to the dot's
    (the .to(x.dtype)); 0 where not ``ok``."""
    v = tl.where(ok, v, 0.0)
    return narrow(narrow(v, STATE_DTYPE).to(tl.float32), OUT_DTYPE)


@triton.jit
def dequant_flat(flat, ok, w_ptr, code_ptr, absmax_ptr, code2_ptr, absmax2_ptr, offset_ptr,
                 BLOCKSIZE: tl.constexpr, BLOCKSIZE2: tl.constexpr, NESTED: tl.constexpr,
                 STATE_DTYPE: tl.constexpr, OUT_DTYPE: tl.constexpr):
    """W's elements at the flat (int64) indices ``flat``, in OUT_DTYPE; 0 where not ``ok``."""
    byte = tl.load(w_ptr + (flat >> 1), mask=ok, other=0).to(tl.int32)
    q = (byte >> (((flat & 1) ^ 1) * 4).to(tl.int32)) & 15
    value = tl.load(code_ptr + q, eviction_policy="evict_last")
    scale = _scale_of(flat // BLOCKSIZE, ok, absmax_ptr, code2_ptr, absmax2_ptr, offset_ptr,
                      BLOCKSIZE2, NESTED)
    return _finish(value * scale, ok, STATE_DTYPE, OUT_DTYPE)


@triton.jit
def _dequantize_kernel(w_ptr, code_ptr, absmax_ptr, code2_ptr, absmax2_ptr, offset_ptr, out_ptr,
                       numel, BLOCKSIZE: tl.constexpr, BLOCKSIZE2: tl.constexpr,
                       NESTED: tl.constexpr, STATE_DTYPE: tl.constexpr, BLOCK: tl.constexpr):
    flat = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = flat < numel
    w = dequant_flat(flat, ok, w_ptr, code_ptr, absmax_ptr, code2_ptr, absmax2_ptr, offset_ptr,
                     BLOCKSIZE, BLOCKSIZE2, NESTED, STATE_DTYPE, out_ptr.dtype.element_ty)
    tl.store(out_ptr + flat, w, mask=ok)


@triton.jit
def matmul_tile_4bit(acc, a_ptr, rows, row_ok, stride_am, stride_ak, depth, others, others_ok,
                     first_col, pair_bytes, K, w_ptr, code_ptr, absmax_ptr, code2_ptr,
                     absmax2_ptr, offset_ptr, TRANSPOSED: tl.constexpr, ALIGNED: tl.constexpr,
                     BLOCKSIZE: tl.constexpr, BLOCKSIZE2: tl.constexpr, NESTED: tl.constexpr,
                     STATE_DTYPE: tl.constexpr, PRECISION: tl.constexpr, BLOCK_K: tl.constexpr,
                     WINDOW: tl.constexpr):
    """acc + a[rows, :]·Wt over ``depth`` in BLOCK_K steps, the W tile dequantized in registers,
    in a's dtype, each step:

    - TRANSPOSED (the forward): Wt = W[others, :]ᵀ, depth = K. ALIGNED (K even, a multiple of
      BLOCKSIZE, which BLOCK_K divides): a tile row of W is BLOCK_K / 2 whole bytes of one
      block, so one absmax per W row and one byte per two elements.
    - else (dx): Wt = W[:, others], depth = N; ``others`` lie in the WINDOW columns from
      ``first_col``. ALIGNED (WINDOW divides BLOCKSIZE): they are one block per W row and come
      in byte pairs: ``pair_bytes`` (len(others) / 2) are their bytes' offsets in a row, whose
      nibbles, interleaved, are ``others``.

    Otherwise (blocks spanning rows, odd K) every element is addressed by its flat index."""
    ks = tl.arange(0, BLOCK_K)
    a_ptrs, a_step = stream(a_ptr, rows, ks, stride_am, stride_ak, stride_ak, BLOCK_K)
    OUT: tl.constexpr = a_ptr.dtype.element_ty
    if ALIGNED and TRANSPOSED and BLOCKSIZE % BLOCK_K == 0:
        byte_ptrs = (w_ptr + (others.to(tl.int64) * (K // 2))[None, :]
                     + tl.arange(0, BLOCK_K // 2)[:, None])
        blocks = others.to(tl.int64) * (K // BLOCKSIZE)
        ok = others_ok[None, :] & (ks < BLOCK_K)[:, None]
        for k0 in range(0, depth, BLOCK_K):
            a = tl.load(a_ptrs, mask=row_ok[:, None], other=0.0)
            byte = tl.load(byte_ptrs, mask=others_ok[None, :], other=0).to(tl.int32)
            hi = tl.load(code_ptr + (byte >> 4), eviction_policy="evict_last")
            lo = tl.load(code_ptr + (byte & 15), eviction_policy="evict_last")
            # rows 2j and 2j + 1 of the tile are the high and low nibbles of byte row j
            v = tl.reshape(tl.permute(tl.join(hi, lo), (0, 2, 1)), (BLOCK_K, others.shape[0]))
            scale = _scale_of(blocks + k0 // BLOCKSIZE, others_ok, absmax_ptr, code2_ptr,
                              absmax2_ptr, offset_ptr, BLOCKSIZE2, NESTED)
            acc = mma(a, _finish(v * scale[None, :], ok, STATE_DTYPE, OUT), acc, PRECISION)
            a_ptrs += a_step
            byte_ptrs += BLOCK_K // 2
    elif ALIGNED and not TRANSPOSED and BLOCKSIZE % WINDOW == 0:
        pair_ok = (pair_bytes * 2) < K
        for n0 in range(0, depth, BLOCK_K):
            n_ok = (n0 + ks) < depth
            a = tl.load(a_ptrs, mask=row_ok[:, None] & n_ok[None, :], other=0.0)
            w_rows = (n0 + ks).to(tl.int64)
            byte = tl.load(w_ptr + (w_rows * (K // 2))[:, None] + pair_bytes[None, :],
                           mask=n_ok[:, None] & pair_ok[None, :], other=0).to(tl.int32)
            hi = tl.load(code_ptr + (byte >> 4), eviction_policy="evict_last")
            lo = tl.load(code_ptr + (byte & 15), eviction_policy="evict_last")
            v = tl.interleave(hi, lo)  # columns 2j, 2j + 1: byte j's high and low nibbles
            scale = _scale_of(w_rows * (K // BLOCKSIZE) + first_col // BLOCKSIZE, n_ok,
                              absmax_ptr, code2_ptr, absmax2_ptr, offset_ptr, BLOCKSIZE2, NESTED)
            b = _finish(v * scale[:, None], n_ok[:, None] & others_ok[None, :], STATE_DTYPE, OUT)
            acc = mma(a, b, acc, PRECISION)
            a_ptrs += a_step
    else:
        for d0 in range(0, depth, BLOCK_K):
            d_ok = (d0 + ks) < depth
            a = tl.load(a_ptrs, mask=row_ok[:, None] & d_ok[None, :], other=0.0)
            if TRANSPOSED:
                flat = others.to(tl.int64)[None, :] * K + (d0 + ks).to(tl.int64)[:, None]
            else:
                flat = (d0 + ks).to(tl.int64)[:, None] * K + others.to(tl.int64)[None, :]
            b = dequant_flat(flat, d_ok[:, None] & others_ok[None, :], w_ptr, code_ptr,
                             absmax_ptr, code2_ptr, absmax2_ptr, offset_ptr, BLOCKSIZE,
                             BLOCKSIZE2, NESTED, STATE_DTYPE, OUT)
            acc = mma(a, b, acc, PRECISION)
            a_ptrs += a_step
    return acc


# y = x·Wᵀ + bias + s·P·B_effᵀ over a 4-bit W, as forward._fused_linear_kernel: the low-rank term
# first, then the K loop with W's tiles dequantized in registers. Backward: _grad_input_4bit_kernel
# (W is frozen: no dW).
@triton.jit
def _fused_linear_4bit_kernel(x_ptr, w_ptr, code_ptr, absmax_ptr, code2_ptr, absmax2_ptr,
                              offset_ptr, bias_ptr, p_ptr, b_ptr, y_ptr, M, M_BUCKET, N, K, R,
                              scaling, stride_xm, stride_xk, stride_bn, stride_br, stride_bias,
                              HAS_BIAS: tl.constexpr, ALIGNED: tl.constexpr,
                              BLOCKSIZE: tl.constexpr,
                              BLOCKSIZE2: tl.constexpr, NESTED: tl.constexpr,
                              STATE_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
                              DOT_DTYPE: tl.constexpr, LR_PRECISION: tl.constexpr,
                              RANK_BLOCK: tl.constexpr, BLOCK_M: tl.constexpr,
                              BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    pid_m, pid_n = grouped_tile(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
    rows, row_ok = tile_span(pid_m, BLOCK_M, M)
    cols, col_ok = tile_span(pid_n, BLOCK_N, N)
    acc = low_rank_tile(p_ptr, b_ptr, rows, cols, row_ok, col_ok, R, scaling, stride_br,
                        stride_bn, DOT_DTYPE, LR_PRECISION, RANK_BLOCK)
    acc = matmul_tile_4bit(acc, x_ptr, rows, row_ok, stride_xm, stride_xk, K, cols, col_ok, 0, 0,
                           K, w_ptr, code_ptr, absmax_ptr, code2_ptr, absmax2_ptr, offset_ptr,
                           True, ALIGNED, BLOCKSIZE, BLOCKSIZE2, NESTED, STATE_DTYPE, PRECISION,
                           BLOCK_K, BLOCK_K)
    if HAS_BIAS:
        acc = add_bias(acc, bias_ptr, cols, col_ok, stride_bias)
    store_tile(y_ptr, acc, rows, cols, row_ok, col_ok, N)


# dx = G·W + dropout(dP·A) over a 4-bit W, as backward._grad_input_kernel (the same derivation),
# W's tiles dequantized in registers inside the loop over N.
# seed not specialised: a seed that is 1 or a multiple of 16 would compile the kernel again.
@triton.jit(do_not_specialize=["seed"])
def _grad_input_4bit_kernel(g_ptr, w_ptr, code_ptr, absmax_ptr, code2_ptr, absmax2_ptr,
                            offset_ptr, dp_ptr, a_ptr, dx_ptr, M, M_BUCKET, N, K, R,
                            stride_gm, stride_gn, stride_ar, stride_ak, seed, p_drop, keep_scale,
                            HAS_DROPOUT: tl.constexpr, ALIGNED: tl.constexpr,
                            BLOCKSIZE: tl.constexpr,
                            BLOCKSIZE2: tl.constexpr, NESTED: tl.constexpr,
                            STATE_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
                            DOT_DTYPE: tl.constexpr, LR_PRECISION: tl.constexpr,
                            RANK_BLOCK: tl.constexpr, BLOCK_M: tl.constexpr,
                            BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    # Output tile (BLOCK_M rows of M) x (BLOCK_N columns of K); the reduction runs over N.
    pid_m, pid_k = grouped_tile(tl.program_id(0), M, K, BLOCK_M, BLOCK_N, GROUP_M)
    rows, row_ok = tile_span(pid_m, BLOCK_M, M)
    dp = low_rank_rows(dp_ptr, rows, row_ok, R, 1.0, DOT_DTYPE, RANK_BLOCK)
    if HAS_DROPOUT:
        acc_lo, acc_hi, cols_lo, cols_hi, lo_ok, hi_ok = dropped_low_rank_halves(
            dp, a_ptr, rows, pid_k * BLOCK_N, K, R, stride_ar, stride_ak, seed, p_drop, keep_scale,
            DOT_DTYPE, LR_PRECISION, RANK_BLOCK, BLOCK_N // 2)
        # byte j of a half: columns 2j, 2j + 1 of it (its 16-column chunks are 8 bytes each)
        pairs = tl.arange(0, BLOCK_N // 4)
        bytes_lo = (pid_k * BLOCK_N) // 2 + (pairs // 8) * 16 + pairs % 8
        acc_lo = matmul_tile_4bit(acc_lo, g_ptr, rows, row_ok, stride_gm, stride_gn, N, cols_lo,
                                  lo_ok, pid_k * BLOCK_N, bytes_lo, K, w_ptr, code_ptr, absmax_ptr,
                                  code2_ptr, absmax2_ptr, offset_ptr, False, ALIGNED, BLOCKSIZE,
                                  BLOCKSIZE2, NESTED, STATE_DTYPE, PRECISION, BLOCK_K, BLOCK_N)
        acc_hi = matmul_tile_4bit(acc_hi, g_ptr, rows, row_ok, stride_gm, stride_gn, N, cols_hi,
                                  hi_ok, pid_k * BLOCK_N, bytes_lo + 8, K, w_ptr, code_ptr, absmax_ptr,
                                  code2_ptr, absmax2_ptr, offset_ptr, False, ALIGNED, BLOCKSIZE,
                                  BLOCKSIZE2, NESTED, STATE_DTYPE, PRECISION, BLOCK_K, BLOCK_N)
        store_tile(dx_ptr, acc_lo, rows, cols_lo, row_ok, lo_ok, K)
        store_tile(dx_ptr, acc_hi, rows, cols_hi, row_ok, hi_ok, K)
    else:
        cols, col_ok = tile_span(pid_k, BLOCK_N, K)
        acc = low_rank_product(dp, a_ptr, cols, col_ok, R, stride_ar, stride_ak, DOT_DTYPE,
                               LR_PRECISION, RANK_BLOCK)
        pair_bytes = (pid_k * BLOCK_N) // 2 + tl.arange(0, BLOCK_N // 2)
        acc = matmul_tile_4bit(acc, g_ptr, rows, row_ok, stride_gm, stride_gn, N, cols, col_ok,
                               pid_k * BLOCK_N, pair_bytes, K, w_ptr, code_ptr, absmax_ptr, code2_ptr,
                               absmax2_ptr, offset_ptr, False, ALIGNED, BLOCKSIZE, BLOCKSIZE2,
                               NESTED, STATE_DTYPE, PRECISION, BLOCK_K, BLOCK_N)  # [dP | G]·[A ; W]
        store_tile(dx_ptr, acc, rows, cols, row_ok, col_ok, K)


def _state_args(w):
    """The packed weight's tensors as kernel arguments (nested ones stand in for themselves
    when absent: never read) and its constexprs."""
    nested = w.nested
    tensors = (w.data, w.code, w.absmax, w.code2 if nested else w.code,
               w.absmax2 if nested else w.code, w.offset if nested else w.code)
    meta = dict(BLOCKSIZE=w.blocksize, BLOCKSIZE2=w.blocksize2 if nested else 1, NESTED=nested,
                STATE_DTYPE=_TL[w.dtype])
    # whole blocks per W row and whole bytes per block: the GEMMs' aligned path (when their
    # tiles divide the blocksize)
    aligned = w.k % 2 == 0 and w.k % w.blocksize == 0 and w.blocksize % 2 == 0
    return tensors, meta, aligned


def _fusion(w) -> dict:
    """Launch option: a nested absmax's product and sum stay separate roundings (bitsandbytes'
    order); a plain one has no multiply-add to fuse, so it keeps the default."""
    return {"enable_fp_fusion": False} if w.nested else {}


def dequantize_4bit(w, dtype=None) -> torch.Tensor:
    """The dense W (N, K) of a ``Packed4bit`` in ``dtype`` (the quant state's by default): the
    values bitsandbytes' dequantize_4bit gives (then cast to ``dtype``), bit for bit."""
    dtype = dtype or (torch.float32 if w.dtype == torch.float64 else w.dtype)
    out = torch.empty((w.n, w.k), dtype=dtype, device=w.device)
    numel = w.n * w.k
    if numel == 0:
        return out
    tensors, meta, _ = _state_args(w)
    block = 1024
    _dequantize_kernel[(triton.cdiv(numel, block),)](*tensors, out, numel, **meta, BLOCK=block,
                                                      **_fusion(w))
    return out


def fused_linear_4bit(x: torch.Tensor, w, bias, p: torch.Tensor, lora_b_eff: torch.Tensor,
                      scaling: float) -> torch.Tensor:
    """y = x·Wᵀ + bias + s·P·B_effᵀ, shape (M, N), in x's dtype, W (a ``Packed4bit``)
    dequantized to x's dtype tile by tile inside the K loop."""
    m, k = x.shape
    n = w.n
    r = p.shape[1]
    y = torch.empty((m, n), dtype=x.dtype, device=x.device)
    if m == 0 or n == 0:
        return y
    tensors, state_meta, aligned = _state_args(w)
    dot_dtype = low_rank_dot_dtype(x.dtype, lora_b_eff.dtype)
    kernel, meta = launcher(_fused_linear_4bit_kernel, for_base("gemm_4bit", x.dtype), key=[
        "M_BUCKET", "N", "K", "R", "HAS_BIAS", "ALIGNED", "BLOCKSIZE", "BLOCKSIZE2", "NESTED", "STATE_DTYPE",
        "PRECISION", "DOT_DTYPE", "LR_PRECISION", "RANK_BLOCK"])
    grid = lambda META: (triton.cdiv(m, META["BLOCK_M"]) * triton.cdiv(n, META["BLOCK_N"]),)  # noqa: E731
    kernel[grid](x, *tensors, bias if bias is not None else y, p, lora_b_eff, y, m, m_bucket(m),
                 n, k, r, float(scaling), x.stride(0), x.stride(1), lora_b_eff.stride(0),
                 lora_b_eff.stride(1), bias.stride(0) if bias is not None else 0,
                 HAS_BIAS=bias is not None, ALIGNED=aligned, **state_meta, PRECISION=dot_precision(x.dtype),
                 DOT_DTYPE=dot_dtype, LR_PRECISION=dot_precision(dot_dtype),
                 RANK_BLOCK=rank_block(r), **meta, **_fusion(w))
    return y


def grad_input_4bit(grad_y: torch.Tensor, w, dp: torch.Tensor, lora_a: torch.Tensor, seed=0,
                    p_drop=0.0) -> torch.Tensor:
    """dx = G·W + dropout(dP·A), shape (M, K), in G's dtype (the compute dtype), W (a
    ``Packed4bit``) dequantized to it tile by tile inside the loop over N."""
    m, n = grad_y.shape
    k = w.k
    r = lora_a.shape[0]
    dx = torch.empty((m, k), dtype=grad_y.dtype, device=grad_y.device)
    if m == 0 or k == 0:
        return dx
    tensors, state_meta, aligned = _state_args(w)
    dot_dtype = low_rank_dot_dtype(grad_y.dtype, lora_a.dtype)
    kernel, meta = launcher(_grad_input_4bit_kernel, for_base("gemm_4bit_dx", grad_y.dtype), key=[
        "M_BUCKET", "N", "K", "R", "HAS_DROPOUT", "ALIGNED", "BLOCKSIZE", "BLOCKSIZE2", "NESTED",
        "STATE_DTYPE", "PRECISION", "DOT_DTYPE", "LR_PRECISION", "RANK_BLOCK"])
    grid = lambda META: (triton.cdiv(m, META["BLOCK_M"]) * triton.cdiv(k, META["BLOCK_N"]),)  # noqa: E731
    kernel[grid](grad_y, *tensors, dp, lora_a, dx, m, m_bucket(m), n, k, r, grad_y.stride(0),
                 grad_y.stride(1), lora_a.stride(0), lora_a.stride(1), seed_arg(seed), p_drop,
                 1.0 / (1.0 - p_drop), HAS_DROPOUT=p_drop > 0.0, ALIGNED=aligned, **state_meta,
                 PRECISION=dot_precision(grad_y.dtype), DOT_DTYPE=dot_dtype,
                 LR_PRECISION=dot_precision(dot_dtype), RANK_BLOCK=rank_block(r), **meta,
                 **_fusion(w))
    return dx
