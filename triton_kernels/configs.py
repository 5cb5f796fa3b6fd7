"""Launch configurations: autotuned per GPU config family and shape (configs that overflow shared
memory pruned first), one fixed set under the interpreter (where autotuning would only multiply
CPU time)."""
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
# Persistent TMA GEMMs (persistent.py; Hopper and later only, so no sm80 list): tiles as in
# Triton's persistent-matmul tutorial, pruned by shared memory and registers (fitting_configs).
GEMM_TMA_CONFIGS = {
    "sm90": [
        _c(8, 3, BLOCK_M=128, BLOCK_N=256, BLOCK_K=64, GROUP_M=8),
        _c(8, 4, BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, GROUP_M=8),
        _c(4, 4, BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, GROUP_M=8),
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


def config_family() -> str:
    """Which config list suits this GPU: "sm90" (Hopper and later) or "sm80". Not dispatch's
    "generation", which names the exact architecture."""
    major, _ = torch.cuda.get_device_capability()
    return "sm90" if major >= 9 else "sm80"


# Opt-in shared memory per block, bytes; sm_86/sm_89/sm_120 (consumer parts) have 99 KB.
_SHARED_MEMORY = {(8, 0): 163 * 1024, (8, 7): 163 * 1024, (9, 0): 227 * 1024,
                  (10, 0): 227 * 1024, (10, 3): 227 * 1024}
_CONSUMER_SHARED_MEMORY = 99 * 1024


def shared_memory_limit(capability) -> int:
    """Bytes of shared memory one program may use on a GPU of this (major, minor) capability."""
    return _SHARED_MEMORY.get(tuple(capability), _CONSUMER_SHARED_MEMORY)


def shared_memory_estimate(config, family: str, base_bytes: int, rank_block_: int) -> int:
    """Bytes of the pipelined tiles a config keeps in shared memory: num_stages copies of the
    streamed operand tiles (base-dtype tiles, and for skinny passes one fp32-sized rank tile;
    the persistent TMA GEMMs add their output tile and one rank tile)."""
    meta, stages = config.kwargs, config.num_stages
    if family == "gemm":
        return stages * (meta["BLOCK_M"] + meta["BLOCK_N"]) * meta["BLOCK_K"] * base_bytes
    if family == "gemm_tma":  # + the TMA store's output tile and the low-rank dot's B tile
        edges = meta["BLOCK_M"] + meta["BLOCK_N"]
        return base_bytes * (stages * edges * meta["BLOCK_K"] + meta["BLOCK_M"] * meta["BLOCK_N"]
                             + meta["BLOCK_N"] * rank_block_)
    rank_tile = max(meta["BLOCK_M"], meta["BLOCK_N"]) * rank_block_ * 4
    return stages * (meta["BLOCK_M"] * meta["BLOCK_N"] * base_bytes + rank_tile)


def registers_fit(config, family: str, rank_block_: int) -> bool:
    """gemm_tma only: the fp32 accumulator and an fp32 low-rank tile (BLOCK_M x rank block) fit
    192 registers per thread (AOT: 4 warps at 128 x 128 spill at r = 128, not at r = 64)."""
    if family != "gemm_tma":
        return True
    meta = config.kwargs
    per_thread = meta["BLOCK_M"] * (meta["BLOCK_N"] + rank_block_) / (32 * config.num_warps)
    return per_thread <= 192


def fitting_configs(configs, family: str, base_bytes: int, rank_block_: int, limit: int):
    """The configs whose estimated shared memory fits ``limit`` bytes and whose registers fit
    (``registers_fit``); never none: the smallest stays. What the autotuner sees, and what
    benchmarks.aot_check compiles."""
    def estimate(c):
        return shared_memory_estimate(c, family, base_bytes, rank_block_)
    return [c for c in configs if estimate(c) <= limit and registers_fit(c, family, rank_block_)
            ] or [min(configs, key=estimate)]


def _pruner(family: str):
    """early_config_prune for triton.autotune: drops configs over the shared-memory limit before
    any is compiled (the autotuner would only skip them after a failed compile)."""
    def prune(configs, named_args, **kwargs):
        base = named_args.get("x_ptr", named_args.get("g_ptr"))
        limit = shared_memory_limit(torch.cuda.get_device_capability(base.device))
        return fitting_configs(configs, family, base.element_size(),
                               kwargs.get("RANK_BLOCK", 16), limit)
    return prune


_TABLES = {"gemm": GEMM_CONFIGS, "gemm_tma": GEMM_TMA_CONFIGS, "skinny": SKINNY_CONFIGS}
_tuned = {}


def launcher(kernel, family: str, key, reset_to_zero=None):
    """(callable kernel, fixed meta-parameters) for this machine: under the interpreter the raw
    kernel and one small config; on a GPU an autotuner over the config family's configs that fit
    its shared memory, keyed by shape, with nothing fixed."""
    if interpreting():
        return kernel, dict(INTERPRETER_SKINNY if family == "skinny" else INTERPRETER_GEMM)
    configs_of = config_family()
    cache_key = (kernel, configs_of)
    if cache_key not in _tuned:
        configs = _TABLES[family][configs_of]
        _tuned[cache_key] = triton.autotune(
            configs, key=key, reset_to_zero=reset_to_zero,
            prune_configs_by={"early_config_prune": _pruner(family)})(kernel)
    return _tuned[cache_key], {}
