"""The one matrix-multiply-accumulate every kernel uses."""
import triton
import triton.language as tl

from .configs import interpreting

# Triton's CPU interpreter multiplies bfloat16 tiles as raw integers; there (and only there) the
# operands are widened to float32 first, which gives the same products a bf16 tensor core does.
WIDEN_OPERANDS = tl.constexpr(interpreting())


@triton.jit
def mma(a, b, acc, PRECISION: tl.constexpr):
    """acc + a·b with fp32 accumulation."""
    if WIDEN_OPERANDS:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc)
    return tl.dot(a, b, acc, input_precision=PRECISION)
