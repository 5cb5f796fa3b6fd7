"""Launch configurations: autotuned per GPU generation and shape, one fixed set under the
interpreter (where autotuning would only multiply CPU time)."""
import os

import torch
import triton
import triton.language as tl


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def rank_block(rank: int) -> int:
    """Rank padded to a power of two >= 16 (tl.dot's smallest tile edge)."""
    return max(16, triton.next_power_of_2(rank))


_TL_DTYPE = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32}


def low_rank_dot_dtype(base_dtype: torch.dtype, adapter_dtype: torch.dtype):
    """The Triton dtype the low-rank dots multiply in (accumulation is always fp32).

    Over a 16-bit base it is the base's dtype: fp32 adapters, activations and gradients are rounded
    at load, so every dot runs on 16-bit tensor cores. Over an fp32 base it is the adapters' dtype
    (PEFT rounds x to it), with TF32 or IEEE per ``dot_precision``. Results keep their own dtype."""
    if base_dtype in (torch.float16, torch.bfloat16):
        return _TL_DTYPE[base_dtype]
    return _TL_DTYPE[adapter_dtype]


def dot_precision(dtype) -> str:
    """fp32 inputs use TF32 only where torch's own matmuls would (torch's allow_tf32, which
    ``torch.set_float32_matmul_precision("high")`` turns on): a caller who kept fp32 everywhere
    and left TF32 off asked for fp32 products."""
    if dtype in (torch.float32, tl.float32) and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"
    return "tf32"


def _c(num_warps, num_stages, **meta):
    return triton.Config(meta, num_warps=num_warps, num_stages=num_stages)


# Main GEMMs (forward y, backward dx): tiles BLOCK_M x BLOCK_N over a BLOCK_K loop.
GEMM_CONFIGS = {
    "sm80": [
        _c(4, 4, BLOCK_M=128, BLOCK_N=128, BLOCK_K=32, GROUP_M=8),
        _c(8, 3, BLOCK_M=128, BLOCK_N=256, BLOCK_K=32, GROUP_M=8),
        _c(4, 4, BLOCK_M=128, BLOCK_N=64, BLOCK_K=32, GROUP_M=8),
        _c(4, 4, BLOCK_M=64, BLOCK_N=128, BLOCK_K=32, GROUP_M=8),
        _c(4, 5, BLOCK_M=64, BLOCK_N=64, BLOCK_K=64, GROUP_M=8),
    ],
    "sm90": [
        _c(8, 3, BLOCK_M=128, BLOCK_N=256, BLOCK_K=64, GROUP_M=8),
        _c(8, 4, BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, GROUP_M=8),
        _c(4, 4, BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, GROUP_M=8),
        _c(8, 3, BLOCK_M=256, BLOCK_N=128, BLOCK_K=64, GROUP_M=8),
        _c(4, 4, BLOCK_M=64, BLOCK_N=128, BLOCK_K=64, GROUP_M=8),
    ],
}
# Skinny passes (P = x·Aᵀ, the pass over G, dA): rows per program and the streamed tile width.
SKINNY_CONFIGS = {
    "sm80": [_c(4, 3, BLOCK_M=64, BLOCK_N=64), _c(4, 3, BLOCK_M=128, BLOCK_N=64),
             _c(8, 3, BLOCK_M=128, BLOCK_N=128), _c(4, 4, BLOCK_M=32, BLOCK_N=128)],
    "sm90": [_c(4, 4, BLOCK_M=64, BLOCK_N=128), _c(8, 3, BLOCK_M=128, BLOCK_N=128),
             _c(4, 4, BLOCK_M=128, BLOCK_N=64), _c(8, 4, BLOCK_M=64, BLOCK_N=256),
             _c(4, 4, BLOCK_M=32, BLOCK_N=128)],
}
INTERPRETER_GEMM = dict(BLOCK_M=32, BLOCK_N=32, BLOCK_K=32, GROUP_M=2)
INTERPRETER_SKINNY = dict(BLOCK_M=32, BLOCK_N=32)


def generation() -> str:
    major, _ = torch.cuda.get_device_capability()
    return "sm90" if major >= 9 else "sm80"


_tuned = {}


def launcher(kernel, family: str, key, reset_to_zero=None):
    """(callable kernel, fixed meta-parameters) for this machine: under the interpreter the raw
    kernel and one small config; on a GPU an autotuner over the generation's configs, keyed by
    shape, with nothing fixed."""
    if interpreting():
        return kernel, dict(INTERPRETER_GEMM if family == "gemm" else INTERPRETER_SKINNY)
    gen = generation()
    cache_key = (kernel, gen)
    if cache_key not in _tuned:
        configs = (GEMM_CONFIGS if family == "gemm" else SKINNY_CONFIGS)[gen]
        _tuned[cache_key] = triton.autotune(configs, key=key, reset_to_zero=reset_to_zero)(kernel)
    return _tuned[cache_key], {}
