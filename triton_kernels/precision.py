"""What the kernels' dots multiply in: the dtype of the low-rank dots' operands, and whether fp32
operands use TF32 (as torch's own matmuls would) or IEEE fp32. Accumulation is always fp32."""
import torch
import triton.language as tl

_TL_DTYPE = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32}


def low_rank_dot_dtype(base_dtype: torch.dtype, adapter_dtype: torch.dtype):
    """The Triton dtype the low-rank dots multiply in (accumulation is always fp32).

    Over a 16-bit base it is the base's dtype: fp32 adapters, activations and gradients are rounded
    at load, so every dot runs on 16-bit tensor cores. Over an fp32 base it is the adapters' dtype
    (PEFT rounds x to it), with TF32 or IEEE per ``dot_precision``. Results keep their own dtype."""
    if base_dtype in (torch.float16, torch.bfloat16):
        return _TL_DTYPE[base_dtype]
    return _TL_DTYPE[adapter_dtype]


def tf32_allowed() -> bool:
    """Whether torch's own fp32 CUDA matmuls may use TF32. Read from the fp32_precision API where
    torch has it (the legacy allow_tf32 raises there once that API was used, as transformers
    does); "none" inherits from ``torch.backends.fp32_precision``. The legacy flag otherwise."""
    matmul = torch.backends.cuda.matmul
    try:
        precision = matmul.fp32_precision
    except AttributeError:  # torch before the fp32_precision API
        return bool(matmul.allow_tf32)
    if precision == "none":  # torch resolves this itself; kept for versions that may not
        precision = getattr(torch.backends, "fp32_precision", "none")
    return precision == "tf32"


def dot_precision(dtype) -> str:
    """fp32 inputs use TF32 only where torch's own matmuls would (``tf32_allowed``, which
    ``torch.set_float32_matmul_precision("high")`` turns on): a caller who kept fp32 everywhere
    and left TF32 off asked for fp32 products."""
    if dtype in (torch.float32, tl.float32) and not tf32_allowed():
        return "ieee"
    return "tf32"
