"""The one matrix-multiply-accumulate every kernel uses, and the one narrowing cast."""
import triton
import triton.language as tl

from .interpreter import interpreting

# Triton's CPU interpreter multiplies bfloat16 tiles as raw integers; there (and only there) the
# operands are widened to float32 first, which gives the same products a bf16 tensor core does.
WIDEN_OPERANDS = tl.constexpr(interpreting())
# The interpreter also narrows float32 to bfloat16 by truncation, where the GPU (cvt.rn) rounds
# to nearest even: ``narrow`` rounds on the bits there, so interpreted runs round as the GPU.
ROUND_ON_BITS = tl.constexpr(interpreting())


@triton.jit
def mma(a, b, acc, PRECISION: tl.constexpr):
    """acc + a·b with fp32 accumulation."""
    if WIDEN_OPERANDS:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc)
    return tl.dot(a, b, acc, input_precision=PRECISION)


@triton.jit
def narrow(x, DTYPE: tl.constexpr):
    """x in DTYPE, rounded to nearest even (what .to(DTYPE) compiles to on a GPU)."""
    if ROUND_ON_BITS and DTYPE == tl.bfloat16 and x.dtype == tl.float32:
        bits = x.to(tl.uint32, bitcast=True)
        rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        # a NaN's payload could carry into the sign: keep NaN as it is
        x = tl.where(x == x, rounded.to(tl.float32, bitcast=True), x)
    return x.to(DTYPE)
