"""Launch configurations: autotuned per GPU config family and shape (configs that overflow shared
memory pruned first), one fixed set under the interpreter (where autotuning would only multiply
CPU time)."""
import os

import torch
import triton
import triton.language as tl


def m_bucket(m: int) -> int:
    """M rounded up to a power of two: the autotuners' key, so a new token count (they vary from
    step to step) reuses the configs tuned for its bucket instead of tuning again."""
    return triton.next_power_of_2(m)


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
        # dx with dropout at r = 128; 4 stages: at 3, ptxas settles at 80 registers and spills
        # a loop-invariant index over fp32 adapters at r = 64
        _c(8, 4, BLOCK_M=64, BLOCK_N=128, BLOCK_K=32, GROUP_M=8),
    ],
    "sm90": [
        _c(8, 3, BLOCK_M=128, BLOCK_N=256, BLOCK_K=64, GROUP_M=8),
        _c(8, 4, BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, GROUP_M=8),
        _c(4, 4, BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, GROUP_M=8),
        _c(8, 3, BLOCK_M=256, BLOCK_N=128, BLOCK_K=64, GROUP_M=8),
        _c(4, 4, BLOCK_M=64, BLOCK_N=128, BLOCK_K=64, GROUP_M=8),
        _c(8, 3, BLOCK_M=64, BLOCK_N=128, BLOCK_K=64, GROUP_M=8),  # dx with dropout at r = 128
    ],
}
# DoRA's GEMMs with dropout (triton_kernels/dora.py): two fp32 accumulators per tile (x·Wᵀ and
# x̃·Wᵀ in the forward, G·W and the dropped term in dx), so half the tile area of GEMM_CONFIGS for
# the same registers.
GEMM_DUAL_CONFIGS = {
    "sm80": [
        _c(8, 4, BLOCK_M=64, BLOCK_N=128, BLOCK_K=32, GROUP_M=8),
        _c(4, 4, BLOCK_M=64, BLOCK_N=64, BLOCK_K=64, GROUP_M=8),
        _c(4, 3, BLOCK_M=64, BLOCK_N=64, BLOCK_K=32, GROUP_M=8),
    ],
    "sm90": [
        _c(8, 3, BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, GROUP_M=8),
        _c(8, 4, BLOCK_M=64, BLOCK_N=128, BLOCK_K=64, GROUP_M=8),
        _c(4, 4, BLOCK_M=64, BLOCK_N=64, BLOCK_K=64, GROUP_M=8),
    ],
}
# DoRA's forward GEMM without dropout (triton_kernels/dora.py): GEMM_CONFIGS less sm_90a's
# 8-warp 256x128, which spilled 68 B there (255 registers: the epilogue's Z store and c scale).
GEMM_DORA_CONFIGS = {
    "sm80": list(GEMM_CONFIGS["sm80"]),
    "sm90": [c for c in GEMM_CONFIGS["sm90"]
             if (c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"]) != (256, 128)],
}
# The 4-bit GEMMs (quantized.py: forward y and dx over a bitsandbytes NF4/FP4 W, dequantized in
# registers inside the K loop). The dequantization costs integer and load instructions per W
# element, paid once per BLOCK_M rows: tall tiles amortise it. The dequantized W tile sits in
# registers beside the accumulator, so no register rule: each config is checked by aot_check.
GEMM_4BIT_CONFIGS = {  # forward: BLOCK_K divides the blocksize (64 by default)
    "sm80": [
        _c(8, 3, BLOCK_M=128, BLOCK_N=128, BLOCK_K=32, GROUP_M=8),
        _c(4, 3, BLOCK_M=128, BLOCK_N=64, BLOCK_K=32, GROUP_M=8),
        _c(4, 4, BLOCK_M=64, BLOCK_N=64, BLOCK_K=32, GROUP_M=8),
    ],
    "sm90": [  # 256 rows: W's tile dequantized once per 256 rows of M (half the work of 128)
        _c(8, 3, BLOCK_M=256, BLOCK_N=64, BLOCK_K=64, GROUP_M=8),
        _c(8, 3, BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, GROUP_M=8),
        _c(4, 3, BLOCK_M=128, BLOCK_N=64, BLOCK_K=64, GROUP_M=8),
        _c(4, 4, BLOCK_M=64, BLOCK_N=64, BLOCK_K=64, GROUP_M=8),
    ],
}
# dx: its BLOCK_N columns (of K) within one block of W's row, so BLOCK_N divides the blocksize.
# sm_80 with dropout: the 8-warp 64-row tile with a 16-deep K step, 2 stages, is what the mask's two halves
# (each dequantizing its own W tile) leave room for at r = 64 and 128 (GEMM_4BIT_REGISTER_BUDGET)
GEMM_4BIT_DX_CONFIGS = {
    "sm80": [
        _c(8, 3, BLOCK_M=128, BLOCK_N=64, BLOCK_K=32, GROUP_M=8),
        _c(4, 3, BLOCK_M=128, BLOCK_N=64, BLOCK_K=32, GROUP_M=8),
        _c(4, 4, BLOCK_M=64, BLOCK_N=64, BLOCK_K=32, GROUP_M=8),
        _c(8, 2, BLOCK_M=64, BLOCK_N=64, BLOCK_K=16, GROUP_M=8),
    ],
    "sm90": [
        _c(8, 3, BLOCK_M=256, BLOCK_N=64, BLOCK_K=64, GROUP_M=8),
        _c(8, 3, BLOCK_M=128, BLOCK_N=64, BLOCK_K=64, GROUP_M=8),
        _c(4, 3, BLOCK_M=128, BLOCK_N=64, BLOCK_K=64, GROUP_M=8),
        _c(4, 4, BLOCK_M=64, BLOCK_N=64, BLOCK_K=64, GROUP_M=8),
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
        _c(4, 3, BLOCK_M=64, BLOCK_N=64, BLOCK_K=64, GROUP_M=8),  # what fits fp32 at r = 128
    ],
}
# Skinny passes (P = x·Aᵀ, dA, the deterministic dB): rows per program and the streamed tile
# width. The last, small config of each list is what still fits at r = 128 (see fitting_configs).
SKINNY_CONFIGS = {  # sm80's 32-row blocks at 3 stages: at 4, ptxas settles at 80 registers
    # and spills the P pass with dropout at r = 1
    "sm80": [_c(4, 3, BLOCK_M=64, BLOCK_N=64), _c(4, 3, BLOCK_M=128, BLOCK_N=64),
             _c(8, 3, BLOCK_M=128, BLOCK_N=128), _c(4, 3, BLOCK_M=32, BLOCK_N=128),
             _c(8, 2, BLOCK_M=64, BLOCK_N=64)],
    "sm90": [_c(4, 4, BLOCK_M=64, BLOCK_N=128), _c(8, 3, BLOCK_M=128, BLOCK_N=128),
             _c(4, 4, BLOCK_M=128, BLOCK_N=64), _c(8, 4, BLOCK_M=64, BLOCK_N=256),
             _c(4, 4, BLOCK_M=32, BLOCK_N=128), _c(8, 3, BLOCK_M=64, BLOCK_N=64)],
}
# The pass over G (dP, and dB / dbias by atomics): each program adds (BLOCK_N x r) partials of dB
# once per BLOCK_N columns, so (M / BLOCK_M)·N·r atomics in all; the 256-row blocks halve that
# where M is large enough to still fill the GPU (the autotuner decides per M bucket), the 8-warp
# 64-row ones keep r = 128 within registers.
GRAD_OUTPUT_CONFIGS = {
    "sm80": [_c(4, 3, BLOCK_M=64, BLOCK_N=64), _c(4, 3, BLOCK_M=128, BLOCK_N=64),
             _c(8, 3, BLOCK_M=128, BLOCK_N=128), _c(4, 4, BLOCK_M=32, BLOCK_N=128),
             _c(8, 3, BLOCK_M=256, BLOCK_N=64), _c(8, 2, BLOCK_M=64, BLOCK_N=64)],
    # sm90's 32-row blocks on 8 warps: on 4, ptxas settles at 72 registers and spills the
    # dP-only pass at r = 64
    "sm90": [_c(4, 4, BLOCK_M=64, BLOCK_N=128), _c(8, 3, BLOCK_M=128, BLOCK_N=128),
             _c(4, 4, BLOCK_M=128, BLOCK_N=64), _c(8, 4, BLOCK_M=64, BLOCK_N=256),
             _c(8, 4, BLOCK_M=32, BLOCK_N=128), _c(8, 3, BLOCK_M=256, BLOCK_N=64),
             _c(8, 2, BLOCK_M=256, BLOCK_N=128), _c(8, 2, BLOCK_M=64, BLOCK_N=128),
             _c(8, 3, BLOCK_M=64, BLOCK_N=64)],
}
# Over an fp32 base (x, G, W in fp32): smaller tiles. 4-byte operands double the shared memory
# and the registers (mma.sync and CUDA-core operands) of a 16-bit tile, and "ieee" dots run on
# CUDA cores, which hold a K slice of both operands per thread: the 16-bit lists overflowed
# shared memory (tf32, r = 128) and spilled (tf32 on sm_80; ieee nearly everywhere, up to 19 KB).
# Kept: what compiled without a spill for tf32 at r = 128, with dropout, on sm_90a and sm_80
# (aot_check checks each config, so no register rule). ieee still spills in some builds (the
# pass over G with dB, dx with dropout; r = 64 and 128): open.
FP32_CONFIGS = {
    "gemm": [_c(4, 3, BLOCK_M=32, BLOCK_N=64, BLOCK_K=32, GROUP_M=8),
             _c(8, 3, BLOCK_M=64, BLOCK_N=128, BLOCK_K=16, GROUP_M=8)],
    "gemm_4bit": [_c(4, 3, BLOCK_M=32, BLOCK_N=64, BLOCK_K=32, GROUP_M=8),
                  _c(8, 3, BLOCK_M=64, BLOCK_N=64, BLOCK_K=32, GROUP_M=8)],
    "gemm_4bit_dx": [_c(4, 3, BLOCK_M=32, BLOCK_N=64, BLOCK_K=32, GROUP_M=8),
                     _c(8, 3, BLOCK_M=64, BLOCK_N=64, BLOCK_K=32, GROUP_M=8)],
    "skinny": [_c(8, 3, BLOCK_M=64, BLOCK_N=32)],
    "grad_output": [_c(4, 2, BLOCK_M=32, BLOCK_N=32), _c(8, 2, BLOCK_M=32, BLOCK_N=64),
                    _c(8, 3, BLOCK_M=64, BLOCK_N=32)],
    "gemm_dual": [_c(4, 3, BLOCK_M=32, BLOCK_N=64, BLOCK_K=32, GROUP_M=8),
                  _c(8, 3, BLOCK_M=64, BLOCK_N=64, BLOCK_K=32, GROUP_M=8)],
}
# DoRA's pass over G: GRAD_OUTPUT_CONFIGS, with its own register rule (register_estimate: G is
# held in fp32 beside its c-scaled copy and the Z tile), which prunes what spilled on sm_90a: the
# 8-warp 256x128 (up to 312 B) and the 4-warp 64x128 at r = 64 (up to 104 B).
GRAD_OUTPUT_DORA_CONFIGS = GRAD_OUTPUT_CONFIGS
FP32_CONFIGS["gemm_dora"] = FP32_CONFIGS["gemm"]
FP32_CONFIGS["grad_output_dora"] = FP32_CONFIGS["grad_output"]
GEMM_4BIT_FAMILIES = ("gemm_4bit", "gemm_4bit_dx")
INTERPRETER_GEMM = dict(BLOCK_M=32, BLOCK_N=32, BLOCK_K=32, GROUP_M=2)
INTERPRETER_SKINNY = dict(BLOCK_M=32, BLOCK_N=32)
CONFIGS = {"gemm": GEMM_CONFIGS, "gemm_tma": GEMM_TMA_CONFIGS, "skinny": SKINNY_CONFIGS,
           "grad_output": GRAD_OUTPUT_CONFIGS, "gemm_dual": GEMM_DUAL_CONFIGS,
           "gemm_dora": GEMM_DORA_CONFIGS, "grad_output_dora": GRAD_OUTPUT_DORA_CONFIGS,
           "gemm_4bit": GEMM_4BIT_CONFIGS, "gemm_4bit_dx": GEMM_4BIT_DX_CONFIGS}
CONFIGS.update({f"{family}_fp32": {"sm80": table, "sm90": table}
                for family, table in FP32_CONFIGS.items()})


def for_base(family: str, base_dtype) -> str:
    """The config family of a launch over a base of ``base_dtype``: ``family``'s fp32 list
    (FP32_CONFIGS) over an fp32 base, ``family`` itself otherwise."""
    if base_dtype == torch.float32 and family in FP32_CONFIGS:
        return f"{family}_fp32"
    return family


# Families whose kernels share another's tile shapes (so its estimates and budgets).
_SAME_SHAPES = {"gemm_dora": "gemm"}


def _shape_family(family: str) -> str:
    """The family whose kernels (so whose estimates) ``family``'s configs are for."""
    family = family.removesuffix("_fp32")
    return _SAME_SHAPES.get(family, family)


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


# Rank tiles are counted at 4 bytes (fp32 adapters, P or dP: the widest the kernels load) plus a
# 16-bit copy (the dot operand they are rounded to): the estimate must hold for every dtype.
_RANK_BYTES, _DOT_BYTES = 4, 2


def shared_memory_estimate(config, family: str, base_bytes: int, rank_block_: int) -> int:
    """Upper bound of the shared memory a config's kernel uses, bytes: num_stages copies of the
    streamed tiles, plus the rank tiles held for the whole loop. Fitted on what the compiler
    allocated in tools.aot_check's builds (sm_90a and sm_80, every kernel of the family):
    never below it, and the closest within ~5%."""
    meta, stages = config.kwargs, config.num_stages
    block_m, block_n = meta["BLOCK_M"], meta["BLOCK_N"]
    family = _shape_family(family)
    if family in ("gemm", "gemm_dual"):  # the rank tiles reuse the K loop's buffers
        return stages * (block_m + block_n) * meta["BLOCK_K"] * base_bytes
    if family in GEMM_4BIT_FAMILIES:  # x (or G) streamed (and W's bytes, 1 per element at
        # most), plus the dequantized W tile staged for the dot
        return (stages * (block_m * base_bytes + block_n) + block_n * base_bytes) * meta["BLOCK_K"]
    if family == "gemm_tma":  # + the TMA store's output tile and the low-rank dot's B tile
        return base_bytes * (stages * (block_m + block_n) * meta["BLOCK_K"] + block_m * block_n
                             + block_n * rank_block_)
    streamed = block_m * block_n * base_bytes
    if family in ("grad_output", "grad_output_dora"):  # G and B streamed; P and the dB
        # partial's conversion held
        return (stages * (streamed + block_n * rank_block_ * _RANK_BYTES)
                + block_n * rank_block_ * _DOT_BYTES + block_m * rank_block_ * _RANK_BYTES)
    rank_tile = max(block_m, block_n) * rank_block_  # A, dP or P beside the streamed tile
    return stages * (streamed + rank_tile * _RANK_BYTES) + rank_tile * _DOT_BYTES


def register_estimate(config, family: str, rank_block_: int) -> float:
    """32-bit registers per thread the tiles need at once (fp32 accumulators, rank tiles as
    loaded, 16-bit streamed tiles), a rough count that ranks configs by register pressure."""
    meta = config.kwargs
    block_m, block_n = meta["BLOCK_M"], meta["BLOCK_N"]
    threads = 32 * config.num_warps
    family = _shape_family(family)
    if family == "gemm":  # accumulator, then the P and B_eff (or dP and A) tiles
        return (block_m * block_n + (block_m + block_n) * rank_block_) / threads
    if family == "gemm_dual":  # two accumulators, the rank tiles
        return (2 * block_m * block_n + (block_m + block_n) * rank_block_) / threads
    if family in GEMM_4BIT_FAMILIES:  # as gemm, plus the W tile being dequantized (fp32)
        return (block_m * block_n + (block_m + block_n) * rank_block_
                + block_n * meta["BLOCK_K"]) / threads
    if family == "gemm_tma":  # accumulator and an fp32 low-rank tile (BLOCK_M x rank block)
        return block_m * (block_n + rank_block_) / threads
    if family == "grad_output":  # G·B accumulator, P, the dB partial, the G tile
        return (2 * block_m * rank_block_ + block_n * rank_block_
                + block_m * block_n / 2) / threads
    if family == "grad_output_dora":  # the same, G held in fp32 too (for dbias and Σ G ⊙ Z)
        return (2 * block_m * rank_block_ + block_n * rank_block_
                + block_m * block_n) / threads
    return ((block_m + block_n) * rank_block_ + block_m * block_n / 2) / threads


# Largest register_estimate a family's configs may have: calibrated on the aot_check builds, where
# configs above it spilled (or sat at 255 registers with nothing left for the epilogue): the
# GEMMs' 128x256 / 256x128 / 4-warp 128x128 tiles at r = 128, the G pass's 8-warp 128x128 at
# r = 128 (sm_90a) and 4-warp 128x64 at r = 64 (sm_80), the skinny passes' 4-warp 128x64 and
# 64x128 at r = 64 (P with dropout, dA) and 8-warp 128x128 at r = 128.
# gemm_tma: 4 warps at 128 x 128 spill at r = 128, not at r = 64.
REGISTER_BUDGET = {"gemm": 256, "gemm_tma": 192, "grad_output": 160, "skinny": 112,
                   "gemm_dual": 192, "grad_output_dora": 160}
# The tiled GEMMs by target and dropout (the dx kernel's mask and scaled low-rank halves): over
# the budget the aot_check builds spilled (sm_90a: 4-warp 128x128 at r = 64 without dropout;
# with dropout 4-warp 128x128 and 8-warp 256x128 from r = 1; sm_80, whose mma.sync keeps
# operands in registers: 4-warp 128x128 from r = 16, 8-warp 128x256 with dropout).
GEMM_REGISTER_BUDGET = {("sm90", False): 240, ("sm90", True): 144,
                        ("sm80", False): 152, ("sm80", True): 144}


# The 4-bit GEMMs: each config is checked by aot_check, so no budget but where builds spilled:
# sm_80's dx with dropout over a nested absmax at r = 64 (8-warp and 4-warp 128 x 64 tiles,
# 16 and 64 bytes) while the 8-warp one compiled clean at r = 16.
GEMM_4BIT_REGISTER_BUDGET = {("gemm_4bit_dx", "sm80", True): 86}


def register_budget(family: str, generation: str = "sm90", dropout: bool = False) -> float:
    """Largest ``register_estimate`` a config of ``family`` may have on ``generation``."""
    if family in GEMM_4BIT_FAMILIES:
        return GEMM_4BIT_REGISTER_BUDGET.get((family, generation, dropout), float("inf"))
    if family.endswith("_fp32"):
        return float("inf")  # small tiles, each checked by aot_check (FP32_CONFIGS)
    family = _shape_family(family)
    if family == "gemm":
        return GEMM_REGISTER_BUDGET[(generation, dropout)]
    return REGISTER_BUDGET[family]


def fits(config, family: str, base_bytes: int, rank_block_: int, limit: int,
         generation: str = "sm90", dropout: bool = False) -> bool:
    """Whether a config passes the pruning rules: shared memory within ``limit`` bytes, registers
    within the budget, and with dropout a skinny pass's streamed tile at most 128 wide (dA's
    8-warp 64x256 spills at 128 registers)."""
    if dropout and _shape_family(family) == "skinny" and config.kwargs["BLOCK_N"] > 128:
        return False
    return (shared_memory_estimate(config, family, base_bytes, rank_block_) <= limit
            and register_estimate(config, family, rank_block_)
            <= register_budget(family, generation, dropout))


def fitting_configs(configs, family: str, base_bytes: int, rank_block_: int, limit: int,
                    generation: str = "sm90", dropout: bool = False):
    """The configs that fit (``fits``); what the autotuner sees, and what tools.aot_check
    compiles. Every rank up to 128 keeps at least one (tests/test_triton_configs.py); past that
    (a 256-wide rank block) the config with the least shared memory stays if none fits."""
    kept = [c for c in configs
            if fits(c, family, base_bytes, rank_block_, limit, generation, dropout)]
    return kept or [min(configs, key=lambda c: shared_memory_estimate(c, family, base_bytes,
                                                                       rank_block_))]


AUTOTUNE_ENV = "LOWRANK_FUSED_AUTOTUNE"
AUTOTUNE_MODES = ("full", "quick")


def autotune_mode() -> str:
    """``LOWRANK_FUSED_AUTOTUNE``: "full" (default; unset or empty) times every fitting config
    once per key; "quick" takes the first fitting config by rule, with no timing (correctness
    runs on a GPU, where tuning would only cost time)."""
    mode = os.environ.get(AUTOTUNE_ENV) or "full"
    if mode not in AUTOTUNE_MODES:
        raise ValueError(f"{AUTOTUNE_ENV}: expected one of {AUTOTUNE_MODES}, got {mode!r}")
    return mode


class CaptureError(RuntimeError):
    """A kernel choice (autotuning, variant timing) was due while a CUDA graph was captured."""


def capturing() -> bool:
    """Whether the current CUDA stream is capturing a graph (never, where CUDA is not up)."""
    return torch.cuda.is_initialized() and torch.cuda.is_current_stream_capturing()


def check_not_capturing(what: str) -> None:
    """Raise CaptureError if a graph is being captured: timing would run kernels (and sync)
    inside the capture, so a choice must be cached by one eager step first."""
    if capturing():
        raise CaptureError(
            f"lowrank_fused: {what} is not chosen yet for this shape and a CUDA graph is being "
            f"captured; run one step (one forward and backward) before capture so the choice "
            f"is cached, or set {AUTOTUNE_ENV}=quick (choice by rule, no timing)")


def _pruner(family: str):
    """early_config_prune for triton.autotune: drops configs over the shared-memory limit before
    any is compiled (the autotuner would only skip them after a failed compile)."""
    def prune(configs, named_args, **kwargs):
        base = named_args.get("x_ptr", named_args.get("g_ptr"))
        capability = torch.cuda.get_device_capability(base.device)
        return fitting_configs(configs, family, base.element_size(),
                               kwargs.get("RANK_BLOCK", 16), shared_memory_limit(capability),
                               "sm90" if capability[0] >= 9 else "sm80",
                               bool(kwargs.get("HAS_DROPOUT", False)))
    return prune


class _Autotuner(triton.runtime.Autotuner):
    """triton's Autotuner with "quick" mode (the first fitting config), no timing where one
    config is left (Triton 3.6 would still time it), and no timing under graph capture."""

    def __init__(self, kernel, configs, key, reset_to_zero, prune, quick: bool):
        super().__init__(kernel, kernel.arg_names, configs, key, reset_to_zero, None,
                         prune_configs_by={"early_config_prune": prune})
        self.quick = quick
        self.timed = True

    def prune_configs(self, kwargs):
        """Only called for a key not tuned yet (and by warmup)."""
        pruned = super().prune_configs(kwargs)
        if self.quick:
            pruned = pruned[:1]
        self.timed = len(pruned) > 1
        if self.timed:
            check_not_capturing(f"the launch config of {self.base_fn.__name__}")
        return pruned

    def _bench(self, *args, config, **meta):
        if not self.timed:  # nothing to choose between: timing would only run the kernel
            return [0.0, 0.0, 0.0]
        return super()._bench(*args, config=config, **meta)


_tuned = {}


def launcher(kernel, family: str, key, reset_to_zero=None):
    """(callable kernel, fixed meta-parameters) for this machine: under the interpreter the raw
    kernel and one small config; on a GPU an autotuner over the config family's configs that fit
    (``fitting_configs``), keyed by ``key`` (shape and the constexpr flags that change the
    compiled kernel), with nothing fixed; ``LOWRANK_FUSED_AUTOTUNE`` picks full or quick tuning.
    ``family``: a key of CONFIGS."""
    mode = autotune_mode()  # checked on every machine, so a bad value fails in CPU tests too
    if interpreting():
        gemm_like = _shape_family(family) in ("gemm", "gemm_tma", "gemm_dual", *GEMM_4BIT_FAMILIES)
        return kernel, dict(INTERPRETER_GEMM if gemm_like else INTERPRETER_SKINNY)
    configs_of = config_family()
    cache_key = (kernel, family, configs_of, mode)  # a mode changed mid-process: its own tuner
    if cache_key not in _tuned:
        _tuned[cache_key] = _Autotuner(kernel, CONFIGS[family][configs_of], key, reset_to_zero,
                                       _pruner(family), quick=mode == "quick")
    return _tuned[cache_key], {}
