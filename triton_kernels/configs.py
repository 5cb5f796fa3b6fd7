"""Launch configurations: the tiles each kernel family may run with on each GPU generation
("sm80": Ampere and Ada, "sm90": Hopper and later), and the one fixed tile of the interpreter.
Which of a family's configs fit a call is fit.py's rule; which one runs, autotuner.py's choice.

A config is written "BLOCK_MxBLOCK_N[xBLOCK_K] wWARPS sSTAGES"; a GEMM's (with a BLOCK_K) walks
its output tiles in groups of GROUP_M = 8 row blocks."""
import torch
import triton


def rank_block(rank: int) -> int:
    """Rank padded to a power of two >= 16 (tl.dot's smallest tile edge)."""
    return max(16, triton.next_power_of_2(rank))


def _configs(*specs: str) -> list:
    """triton.Configs from specs such as "128x256x64 w8 s3" (see the module docstring)."""
    configs = []
    for spec in specs:
        tile, warps, stages = spec.split()
        meta = dict(zip(("BLOCK_M", "BLOCK_N", "BLOCK_K"), map(int, tile.split("x"))))
        if "BLOCK_K" in meta:
            meta["GROUP_M"] = 8
        configs.append(triton.Config(meta, num_warps=int(warps.removeprefix("w")),
                                     num_stages=int(stages.removeprefix("s"))))
    return configs


# Main GEMMs (forward y, backward dx): tiles BLOCK_M x BLOCK_N over a BLOCK_K loop. The last of
# each list is dx with dropout at r = 128; on sm80 at 4 stages: at 3, ptxas settles at 80
# registers and spills a loop-invariant index over fp32 adapters at r = 64.
GEMM_CONFIGS = {
    "sm80": _configs("128x128x32 w4 s4", "128x256x32 w8 s3", "128x64x32 w4 s4",
                     "64x128x32 w4 s4", "64x64x64 w4 s5", "64x128x32 w8 s4"),
    "sm90": _configs("128x256x64 w8 s3", "128x128x64 w8 s4", "128x128x64 w4 s4",
                     "256x128x64 w8 s3", "64x128x64 w4 s4", "64x128x64 w8 s3"),
}
# DoRA's GEMMs with dropout (dora.py): two fp32 accumulators per tile (x·Wᵀ and x̃·Wᵀ in the
# forward, G·W and the dropped term in dx), so half the tile area of GEMM_CONFIGS for the same
# registers.
GEMM_DUAL_CONFIGS = {"sm80": _configs("64x128x32 w8 s4", "64x64x64 w4 s4", "64x64x32 w4 s3"),
                     "sm90": _configs("128x128x64 w8 s3", "64x128x64 w8 s4", "64x64x64 w4 s4")}
# DoRA's forward GEMM without dropout (dora.py): GEMM_CONFIGS less sm_90a's 8-warp 256x128,
# which spilled 68 B there (255 registers: the epilogue's Z store and c scale).
GEMM_DORA_CONFIGS = {
    "sm80": list(GEMM_CONFIGS["sm80"]),
    "sm90": [c for c in GEMM_CONFIGS["sm90"]
             if (c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"]) != (256, 128)],
}
# The 4-bit GEMMs (quantized.py: forward y and dx over a bitsandbytes NF4/FP4 W, dequantized in
# registers inside the K loop). The dequantization costs integer and load instructions per W
# element, paid once per BLOCK_M rows: tall tiles amortise it (sm90's 256 rows: half the work of
# 128). The dequantized W tile sits in registers beside the accumulator, so no register rule:
# each config is checked by aot_check. Forward: BLOCK_K divides the blocksize (64 by default).
GEMM_4BIT_CONFIGS = {
    "sm80": _configs("128x128x32 w8 s3", "128x64x32 w4 s3", "64x64x32 w4 s4"),
    "sm90": _configs("256x64x64 w8 s3", "128x128x64 w8 s3", "128x64x64 w4 s3",
                     "64x64x64 w4 s4"),
}
# dx: its BLOCK_N columns (of K) within one block of W's row, so BLOCK_N divides the blocksize.
# sm80's last, with dropout: the 8-warp 64-row tile with a 16-deep K step, 2 stages, is what the
# mask's two halves (each dequantizing its own W tile) leave room for at r = 64 and 128
# (fit.GEMM_4BIT_REGISTER_BUDGET).
GEMM_4BIT_DX_CONFIGS = {
    "sm80": _configs("128x64x32 w8 s3", "128x64x32 w4 s3", "64x64x32 w4 s4", "64x64x16 w8 s2"),
    "sm90": _configs("256x64x64 w8 s3", "128x64x64 w8 s3", "128x64x64 w4 s3",
                     "64x64x64 w4 s4"),
}
# Persistent TMA GEMMs (persistent.py; Hopper and later only, so no sm80 list): tiles as in
# Triton's persistent-matmul tutorial, pruned by shared memory and registers (fit.py); the last
# is what fits fp32 at r = 128.
GEMM_TMA_CONFIGS = {"sm90": _configs("128x256x64 w8 s3", "128x128x64 w8 s4", "128x128x64 w4 s4",
                                     "64x128x64 w4 s4", "64x64x64 w4 s3")}
# Skinny passes (P = x·Aᵀ, dA, the deterministic dB): rows per program and the streamed tile
# width. The last, small config of each list is what still fits at r = 128 (see fit.py). sm80's
# 32-row blocks at 3 stages: at 4, ptxas settles at 80 registers and spills the P pass with
# dropout at r = 1.
SKINNY_CONFIGS = {
    "sm80": _configs("64x64 w4 s3", "128x64 w4 s3", "128x128 w8 s3", "32x128 w4 s3",
                     "64x64 w8 s2"),
    "sm90": _configs("64x128 w4 s4", "128x128 w8 s3", "128x64 w4 s4", "64x256 w8 s4",
                     "32x128 w4 s4", "64x64 w8 s3"),
}
# The pass over G (dP, and dB / dbias by atomics): each program adds (BLOCK_N x r) partials of dB
# once per BLOCK_N columns, so (M / BLOCK_M)·N·r atomics in all; the 256-row blocks halve that
# where M is large enough to still fill the GPU (the autotuner decides per M bucket), the 8-warp
# 64-row ones keep r = 128 within registers. sm90's 32-row blocks on 8 warps: on 4, ptxas
# settles at 72 registers and spills the dP-only pass at r = 64.
GRAD_OUTPUT_CONFIGS = {
    "sm80": _configs("64x64 w4 s3", "128x64 w4 s3", "128x128 w8 s3", "32x128 w4 s4",
                     "256x64 w8 s3", "64x64 w8 s2"),
    "sm90": _configs("64x128 w4 s4", "128x128 w8 s3", "128x64 w4 s4", "64x256 w8 s4",
                     "32x128 w8 s4", "256x64 w8 s3", "256x128 w8 s2", "64x128 w8 s2",
                     "64x64 w8 s3"),
}
# Over an fp32 base (x, G, W in fp32): smaller tiles. 4-byte operands double the shared memory
# and the registers (mma.sync and CUDA-core operands) of a 16-bit tile, and "ieee" dots run on
# CUDA cores, which hold a K slice of both operands per thread: the 16-bit lists overflowed
# shared memory (tf32, r = 128) and spilled (tf32 on sm_80; ieee nearly everywhere, up to 19 KB).
# Kept: what compiled without a spill for tf32 at r = 128, with dropout, on sm_90a and sm_80
# (aot_check checks each config, so no register rule). ieee still spills in some builds (the
# pass over G with dB, dx with dropout; r = 64 and 128): open.
FP32_CONFIGS = {
    "gemm": _configs("32x64x32 w4 s3", "64x128x16 w8 s3"),
    "gemm_4bit": _configs("32x64x32 w4 s3", "64x64x32 w8 s3"),
    "gemm_4bit_dx": _configs("32x64x32 w4 s3", "64x64x32 w8 s3"),
    "skinny": _configs("64x32 w8 s3"),
    "grad_output": _configs("32x32 w4 s2", "32x64 w8 s2", "64x32 w8 s3"),
    "gemm_dual": _configs("32x64x32 w4 s3", "64x64x32 w8 s3"),
}
# DoRA's pass over G: GRAD_OUTPUT_CONFIGS, with its own register rule (fit.register_estimate: G
# is held in fp32 beside its c-scaled copy and the Z tile), which prunes what spilled on sm_90a:
# the 8-warp 256x128 (up to 312 B) and the 4-warp 64x128 at r = 64 (up to 104 B).
GRAD_OUTPUT_DORA_CONFIGS = GRAD_OUTPUT_CONFIGS
FP32_CONFIGS["gemm_dora"] = FP32_CONFIGS["gemm"]
FP32_CONFIGS["grad_output_dora"] = FP32_CONFIGS["grad_output"]
GEMM_4BIT_FAMILIES = ("gemm_4bit", "gemm_4bit_dx")
CONFIGS = {"gemm": GEMM_CONFIGS, "gemm_tma": GEMM_TMA_CONFIGS, "skinny": SKINNY_CONFIGS,
           "grad_output": GRAD_OUTPUT_CONFIGS, "gemm_dual": GEMM_DUAL_CONFIGS,
           "gemm_dora": GEMM_DORA_CONFIGS, "grad_output_dora": GRAD_OUTPUT_DORA_CONFIGS,
           "gemm_4bit": GEMM_4BIT_CONFIGS, "gemm_4bit_dx": GEMM_4BIT_DX_CONFIGS}
CONFIGS.update({f"{family}_fp32": {"sm80": table, "sm90": table}
                for family, table in FP32_CONFIGS.items()})
# The interpreter's one config per kind (autotuning there would only multiply CPU time).
INTERPRETER_GEMM = dict(BLOCK_M=32, BLOCK_N=32, BLOCK_K=32, GROUP_M=2)
INTERPRETER_SKINNY = dict(BLOCK_M=32, BLOCK_N=32)


def for_base(family: str, base_dtype) -> str:
    """The config family of a launch over a base of ``base_dtype``: ``family``'s fp32 list
    (FP32_CONFIGS) over an fp32 base, ``family`` itself otherwise."""
    if base_dtype == torch.float32 and family in FP32_CONFIGS:
        return f"{family}_fp32"
    return family


# Families whose kernels share another's tile shapes (so its estimates and budgets).
_SAME_SHAPES = {"gemm_dora": "gemm"}


def shape_family(family: str) -> str:
    """The family whose kernels (so whose estimates) ``family``'s configs are for."""
    family = family.removesuffix("_fp32")
    return _SAME_SHAPES.get(family, family)


def interpreter_config(family: str) -> dict:
    """The fixed meta-parameters of ``family``'s kernels under the interpreter."""
    gemm_like = shape_family(family) in ("gemm", "gemm_tma", "gemm_dual", *GEMM_4BIT_FAMILIES)
    return dict(INTERPRETER_GEMM if gemm_like else INTERPRETER_SKINNY)
