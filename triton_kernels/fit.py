"""Which launch configs fit a GPU: an upper bound of each config's shared memory, a rough count
of its registers, and the budgets calibrated on tools.aot_check's builds. ``fitting_configs`` is
what the autotuner sees and what aot_check compiles."""
from .configs import GEMM_4BIT_FAMILIES, shape_family

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
    family = shape_family(family)
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
    family = shape_family(family)
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
        return float("inf")  # small tiles, each checked by aot_check (configs.FP32_CONFIGS)
    family = shape_family(family)
    if family == "gemm":
        return GEMM_REGISTER_BUDGET[(generation, dropout)]
    return REGISTER_BUDGET[family]


def fits(config, family: str, base_bytes: int, rank_block_: int, limit: int,
         generation: str = "sm90", dropout: bool = False) -> bool:
    """Whether a config passes the pruning rules: shared memory within ``limit`` bytes, registers
    within the budget, and with dropout a skinny pass's streamed tile at most 128 wide (dA's
    8-warp 64x256 spills at 128 registers)."""
    if dropout and shape_family(family) == "skinny" and config.kwargs["BLOCK_N"] > 128:
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
