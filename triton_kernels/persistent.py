"""Persistent TMA variants of the two main GEMMs (Hopper and later):

- y  = x·Wᵀ + bias + (s·P)·B_effᵀ     (forward.fused_linear)
- dx = G·W + dP·A                     (backward.grad_input, without dropout)

One program per SM walks the output tiles in grouped order; x / G and W stream through TMA
tensor descriptors made in the kernel (``tl.make_tensor_descriptor``), the output goes back
through one. The low-rank term (r columns) is computed first into the accumulator with plain
loads, then the main K loop accumulates on top of it.

TMA needs a last stride of 1, 16-byte aligned base pointers and 16-byte aligned other strides;
``describable`` says whether a call meets that, and the launchers in forward.py / backward.py
fall back to the tiled kernels where it does not.

In-kernel descriptors live in a global-memory scratch that Triton gets from the allocator of
``triton.set_allocator``. ``ensure_allocator`` installs one backed by torch's caching allocator
only where none is set (in the calling thread's context), so a caller's own allocator is kept.
"""
import torch
import triton
import triton.language as tl

from .autotuner import launcher
from .configs import rank_block
from .low_rank import low_rank_tile
from .mma import mma, narrow
from .precision import dot_precision, low_rank_dot_dtype
from .tiling import add_bias, grouped_tile, tile_span

# Programs off a GPU (the interpreter, meta tensors): few, so each walks several tiles.
INTERPRETER_PROGRAMS = 3


def describable(*tensors: torch.Tensor) -> bool:
    """Whether TMA can describe every one of these 2-D tensors: last stride 1, base pointer and
    the other stride 16-byte aligned."""
    for t in tensors:
        size = t.element_size()
        if t.dim() != 2 or t.stride(1) != 1 or (t.stride(0) * size) % 16 or t.data_ptr() % 16:
            return False
    return True


def scratch_buffer(size: int, device) -> torch.Tensor:
    """``size`` bytes of descriptor scratch on ``device``. torch's caching allocator returns
    256-byte aligned blocks; the descriptors need 128."""
    return torch.empty(size, dtype=torch.int8, device=device)


def _torch_scratch(size: int, alignment: int, stream):
    # Triton passes no device: the kernel runs on the current one, which the backend's device
    # guard made the tensors' (not device="cuda": that is whatever torch calls current).
    return scratch_buffer(size, torch.device("cuda", torch.cuda.current_device()))


def ensure_allocator() -> None:
    """Install a torch-backed Triton allocator unless one is already set (in this context)."""
    from triton.runtime import _allocation
    if _allocation._allocator.get() is _allocation._NULL_ALLOCATOR:
        triton.set_allocator(_torch_scratch)


def num_programs(device: torch.device) -> int:
    """Programs of the persistent grid (at most; never more than tiles): the SM count, a few
    elsewhere (the interpreter) so each program walks several tiles."""
    if device.type != "cuda":
        return INTERPRETER_PROGRAMS
    return torch.cuda.get_device_properties(device).multi_processor_count


# y = x·Wᵀ + bias + s·P·B_effᵀ, as forward._fused_linear_kernel, one program per SM walking the
# output tiles.
@triton.jit
def _fused_linear_tma_kernel(x_ptr, w_ptr, bias_ptr, p_ptr, b_ptr, y_ptr, M, M_BUCKET, N, K, R,
                             scaling, stride_xm, stride_wn, stride_bn, stride_br, stride_bias,
                             programs, HAS_BIAS: tl.constexpr, PRECISION: tl.constexpr,
                             DOT_DTYPE: tl.constexpr, LR_PRECISION: tl.constexpr,
                             RANK_BLOCK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                             BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    x_desc = tl.make_tensor_descriptor(x_ptr, shape=[M, K], strides=[stride_xm, 1],
                                       block_shape=[BLOCK_M, BLOCK_K])
    w_desc = tl.make_tensor_descriptor(w_ptr, shape=[N, K], strides=[stride_wn, 1],
                                       block_shape=[BLOCK_N, BLOCK_K])
    y_desc = tl.make_tensor_descriptor(y_ptr, shape=[M, N], strides=[N, 1],
                                       block_shape=[BLOCK_M, BLOCK_N])
    tiles = tl.cdiv(M, BLOCK_M) * tl.cdiv(N, BLOCK_N)
    # Not flatten=True: flattened, the pipeliner also multi-buffers the rank tiles, in the
    # adapters' dtype (AOT, fp32 adapters, r = 128: 480 KB of shared memory instead of 192).
    for tile in tl.range(tl.program_id(0), tiles, programs):
        pid_m, pid_n = grouped_tile(tile, M, N, BLOCK_M, BLOCK_N, GROUP_M)
        first_row = pid_m * BLOCK_M
        first_col = pid_n * BLOCK_N
        rows, row_ok = tile_span(pid_m, BLOCK_M, M)
        cols, col_ok = tile_span(pid_n, BLOCK_N, N)
        # The low-rank term first: [s·P | x]·[B_eff | W]ᵀ.
        acc = low_rank_tile(p_ptr, b_ptr, rows, cols, row_ok, col_ok, R, scaling, stride_br,
                            stride_bn, DOT_DTYPE, LR_PRECISION, RANK_BLOCK)
        for k0 in range(0, K, BLOCK_K):  # TMA zero-fills past M, N and K
            acc = mma(x_desc.load([first_row, k0]), w_desc.load([first_col, k0]).T, acc,
                      PRECISION)
        if HAS_BIAS:
            acc = add_bias(acc, bias_ptr, cols, col_ok, stride_bias)
        y_desc.store([first_row, first_col], narrow(acc, y_ptr.dtype.element_ty))


# dx = G·W + dP·A (no dropout), as backward._grad_input_kernel, one program per SM.
@triton.jit
def _grad_input_tma_kernel(g_ptr, w_ptr, dp_ptr, a_ptr, dx_ptr, M, M_BUCKET, N, K, R,
                           stride_gm, stride_wn, stride_ar, stride_ak, programs,
                           PRECISION: tl.constexpr, DOT_DTYPE: tl.constexpr,
                           LR_PRECISION: tl.constexpr, RANK_BLOCK: tl.constexpr,
                           BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                           BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    # Output tile (BLOCK_M rows of M) x (BLOCK_N columns of K); the reduction runs over N in
    # BLOCK_K steps, after the r steps of dP·A.
    g_desc = tl.make_tensor_descriptor(g_ptr, shape=[M, N], strides=[stride_gm, 1],
                                       block_shape=[BLOCK_M, BLOCK_K])
    w_desc = tl.make_tensor_descriptor(w_ptr, shape=[N, K], strides=[stride_wn, 1],
                                       block_shape=[BLOCK_K, BLOCK_N])
    dx_desc = tl.make_tensor_descriptor(dx_ptr, shape=[M, K], strides=[K, 1],
                                        block_shape=[BLOCK_M, BLOCK_N])
    tiles = tl.cdiv(M, BLOCK_M) * tl.cdiv(K, BLOCK_N)
    for tile in tl.range(tl.program_id(0), tiles, programs):  # not flattened: as above
        pid_m, pid_k = grouped_tile(tile, M, K, BLOCK_M, BLOCK_N, GROUP_M)
        first_row = pid_m * BLOCK_M
        first_col = pid_k * BLOCK_N
        rows, row_ok = tile_span(pid_m, BLOCK_M, M)
        cols, col_ok = tile_span(pid_k, BLOCK_N, K)
        acc = low_rank_tile(dp_ptr, a_ptr, rows, cols, row_ok, col_ok, R, 1.0, stride_ar,
                            stride_ak, DOT_DTYPE, LR_PRECISION, RANK_BLOCK)
        for n0 in range(0, N, BLOCK_K):
            acc = mma(g_desc.load([first_row, n0]), w_desc.load([n0, first_col]), acc, PRECISION)
        dx_desc.store([first_row, first_col], narrow(acc, dx_ptr.dtype.element_ty))


def _persistent_grid(rows: int, cols: int, programs: int):
    """min(programs, output tiles): the kernels step through the tiles by ``programs``."""
    return lambda META: (min(programs, triton.cdiv(rows, META["BLOCK_M"])  # noqa: E731
                             * triton.cdiv(cols, META["BLOCK_N"])),)


def fused_linear(x, weight, bias, p, lora_b_eff, scaling, y):
    """y = x·Wᵀ + bias + s·P·B_effᵀ written into ``y`` (M x N, contiguous) by the persistent
    TMA kernel. The caller checks ``describable(x, weight, y)`` first."""
    m, k = x.shape
    n = weight.shape[0]
    r = p.shape[1]
    if x.device.type == "cuda":
        ensure_allocator()
    dot_dtype = low_rank_dot_dtype(x.dtype, lora_b_eff.dtype)
    kernel, meta = launcher(_fused_linear_tma_kernel, "gemm_tma", key=[
        "M_BUCKET", "N", "K", "R", "HAS_BIAS", "PRECISION", "DOT_DTYPE", "LR_PRECISION",
        "RANK_BLOCK"])
    programs = num_programs(x.device)
    kernel[_persistent_grid(m, n, programs)](
        x, weight, bias if bias is not None else y, p, lora_b_eff, y, m,
        triton.next_power_of_2(m), n, k, r, float(scaling), x.stride(0), weight.stride(0),
        lora_b_eff.stride(0), lora_b_eff.stride(1), bias.stride(0) if bias is not None else 0,
        programs, HAS_BIAS=bias is not None, PRECISION=dot_precision(x.dtype),
        DOT_DTYPE=dot_dtype, LR_PRECISION=dot_precision(dot_dtype), RANK_BLOCK=rank_block(r),
        **meta)
    return y


def grad_input(grad_y, weight, dp, lora_a, dx):
    """dx = G·W + dP·A written into ``dx`` (M x K, contiguous) by the persistent TMA kernel (no
    dropout). The caller checks ``describable(grad_y, weight, dx)`` first."""
    m, n = grad_y.shape
    k = weight.shape[1]
    r = lora_a.shape[0]
    if grad_y.device.type == "cuda":
        ensure_allocator()
    dot_dtype = low_rank_dot_dtype(weight.dtype, lora_a.dtype)
    kernel, meta = launcher(_grad_input_tma_kernel, "gemm_tma", key=[
        "M_BUCKET", "N", "K", "R", "PRECISION", "DOT_DTYPE", "LR_PRECISION", "RANK_BLOCK"])
    programs = num_programs(grad_y.device)
    kernel[_persistent_grid(m, k, programs)](
        grad_y, weight, dp, lora_a, dx, m, triton.next_power_of_2(m), n, k, r,
        grad_y.stride(0), weight.stride(0), lora_a.stride(0), lora_a.stride(1), programs,
        PRECISION=dot_precision(weight.dtype), DOT_DTYPE=dot_dtype,
        LR_PRECISION=dot_precision(dot_dtype), RANK_BLOCK=rank_block(r),
        **meta)
    return dx
