"""Traffic/FLOP model of each backend's kernel sequence (a prediction, not a measurement).

    python -m tools.model [--set KEY=VALUE ...] [--after KEY=VALUE ...] [--markdown PATH]

Every backend is a list of passes (``Pass``: HBM bytes, FLOPs per execution unit, integer ops,
atomics, programs). A pass takes launch + max(bytes / bandwidth, compute), compute being the
sum of each unit's FLOPs over its rate, stretched when the pass has fewer programs than SMs,
plus its atomics. The sequences follow the code as it is (backends/triton.py and
triton_kernels/, backends/cuda.py and csrc/, PEFT's LoRA layer under bf16 autocast, a frozen
nn.Linear; ``--dora``: the fused DoRA design against PEFT's DoRA layer); what the kernels do is in ``Code``, the hardware in ``Hardware``: a kernel change is
a one-field change, quoted before/after with ``--after field=value``.
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
from dataclasses import dataclass, field, replace

METHODS = ("lora", "lora_fa", "lora_xs")
# (label, M, K, N): tokens x in-features x out-features.
SHAPES = (("4096²", 8192, 4096, 4096), ("4096→11008", 8192, 4096, 11008),
          ("roberta-large", 4096, 1024, 1024))  # RoBERTa-large: 8 x 512 tokens, hidden 1024
RANKS = (16, 64)


@dataclass
class Hardware:
    """H100 SXM assumptions (override with --set)."""
    gemm_tflops: float = 700.0  # cuBLAS bf16 dense GEMM, achieved
    triton_gemm_efficiency: float = 1.0  # Triton main GEMM / cuBLAS (the largest unknown)
    tf32_tflops: float = 350.0  # tensor cores, tf32 operands
    skinny_tc_tflops: float = 300.0  # tensor cores in an r-wide (skinny) dot: N = r tiles
    cuda_core_tflops: float = 50.0  # fp32 FMA on CUDA cores, achieved (67 peak)
    hbm_tb_s: float = 2.9
    int_tops: float = 15.0  # 32-bit integer ops/s on CUDA cores, tera
    # instructions issued per second, all kinds: 4 warp-instructions per clock per SM, 32 lanes,
    # 132 SMs at 1.83 GHz (what bounds a loop of mixed integer, fp32 and load instructions)
    issue_tops: float = 30.9
    atom_per_ns: float = 200.0  # acq_rel fp32 atom throughput (L2), per ns: unmeasured
    red_per_ns: float = 400.0  # relaxed fp32 red throughput, per ns: unmeasured
    launch_us: float = 4.0  # per kernel launch, host + device
    sms: int = 132


@dataclass
class Code:
    """What the kernels do today; each field is one kernel's property (kern16's changes land
    here as one-line updates)."""
    # the hash mask (lowrank_fused/dropout.py): integer SASS instructions it adds per element in
    # the Triton kernels, measured by tools.aot_check for sm_90a (P pass 7.0, dA 6.8, dx
    # 4.6; the worst is used; the per-element hash before pairs: 13.7; Philox `tl.rand`: 64)
    rng_int_ops: float = 7.0
    # csrc computes keep() per element (one hash each, keys hoisted): the unpaired figure
    cuda_rng_int_ops: float = 13.7
    peft_rng_int_ops: float = 24.0  # torch dropout: Philox, 4 values per call
    triton_fp32_adapter_unit: str = "tc"  # fp32 adapters rounded to the 16-bit base at load
    triton_grad_a_unit: str = "tc"  # grad_a on 16-bit operands too
    triton_grad_a_block_n: int = 128  # dA columns per program
    # grad_a splits M until ~2 programs per SM, each writing an fp32 r x K partial (summed after)
    triton_grad_a_split_m: bool = True
    triton_gop_block_m: int = 64  # rows per program of the G pass = atomics divisor
    triton_atomic: str = "red"  # relaxed fp32 atomics ("atom": acq_rel)
    # dB's fp32 accumulator: True: torch.zeros per call; False: kept zeroed between calls
    # (triton_kernels/accumulators.py), which a 16-bit dB uses; an fp32 dB is always fresh
    triton_db_memset: bool = False
    # csrc over a 16-bit base: every rank pass on mma.sync, fp32 operands rounded at load ("fma":
    # the CUDA-core kernels, as before issue 16 item 5; an fp32 base always runs on them)
    cuda_fp32_adapter_unit: str = "tc"  # P and G passes over fp32 adapters
    cuda_grad_a_unit: str = "tc"  # dA = dPᵀ·dropout(x)
    cuda_dropout_term_unit: str = "tc"  # dropout(dP·A), dx's low-rank term under dropout
    # False: y.addmm_ / dx.addmm_ re-read and re-write the output after the cuBLAS GEMM; True:
    # the low-rank term (and bias) is written first and the GEMM adds into it with beta = 1
    cuda_low_rank_first: bool = True
    cuda_gop_block_m: int = 64
    # csrc's atomicAdd with its result unused compiles to relaxed RED (SASS for sm_90a)
    cuda_atomic: str = "red"
    # LoRA-XS's dR: False: Pᵀ·(s·G·B) from the G pass's r-wide result, so with B frozen the pass
    # computes no dB (no atomics, no accumulator); True: through dB_eff = s·Gᵀ·P (N x r, atomics)
    # and dR = dB_effᵀ·B, as before
    xs_db_eff: bool = False
    # A 4-bit base (bitsandbytes NF4, triton_kernels/quantized.py): W's tile is dequantized in
    # registers inside the forward's and dx's K loops, once per BLOCK_M rows of M. Instructions
    # per W element the K loop adds, counted in the SASS of fused_linear_4bit's loop body
    # (sm_90a, 8 warps, 128 x 128 x 64, bf16, plain absmax: 427 instructions per thread and
    # step against the dense kernel's 126, over 32 W elements per thread; nested: 485, 11.2
    # per element), and the dense loop's own (126 / 32). ``dequant_overlap``: the share of the
    # added instructions issued beside the tensor cores (0: added to the GEMM's time; 1: the
    # GEMM takes the longer of its tensor-core time and its whole loop's issue time).
    dequant_ops: float = 9.4
    gemm_loop_ops: float = 3.9
    # rows of M per dequantized W tile: 128, the tile the SASS count is from; the sm_90a lists
    # also offer 256-row tiles (the autotuner decides; --set dequant_block_m=256 predicts them)
    dequant_block_m: int = 128
    dequant_overlap: float = 0.0
    # DoRA (the planned fused kernels, issue 22): rows per program of the G pass, which reduces
    # dm = Σ_rows G ⊙ y (and dB) with one fp32 atomic per column (and per column x r) per block
    dora_gop_block_m: int = 64
    # DoRA with dropout: the P pass writes x̃ (M x K, base dtype) for the forward's second
    # accumulator (True) instead of every N tile regenerating the mask (False: N / 128 hashes
    # per element of x)
    dora_write_dropped_x: bool = True


@dataclass
class Pass:
    """One kernel launch: HBM bytes moved, FLOPs per unit ("gemm", "tc", "tf32", "fma"), integer
    ops, atomics ("atom"/"red" counts) and programs (0: enough to fill the GPU)."""
    name: str
    bytes: float = 0.0
    flops: dict = field(default_factory=dict)
    int_ops: float = 0.0
    atomics: dict = field(default_factory=dict)
    programs: int = 0
    launches: int = 1
    # instructions (any kind, at Hardware.issue_tops): ``issue_ops`` add to the pass's compute,
    # ``side_issue_ops`` run beside it (the pass takes the longer): a 4-bit GEMM's loop
    issue_ops: float = 0.0
    side_issue_ops: float = 0.0


@dataclass(frozen=True)
class Case:
    method: str
    m: int
    k: int
    n: int
    r: int
    dropout: bool
    base_bytes: int = 2  # bf16 base
    adapter_bytes: int = 4  # fp32 adapters (LowRankLinear's and PEFT's default)
    # "nf4": W is a bitsandbytes 4-bit Params4bit (blocksize 64, fp32 absmax; x, G in the base
    # dtype): the Triton backend's GEMMs read its packed bytes and dequantize inside the K loop
    quant: str = ""


def pass_time(p: Pass, hw: Hardware, gemm_efficiency: float = 1.0) -> float:
    """Seconds for one pass."""
    rates = {"gemm": hw.gemm_tflops * 1e12 * gemm_efficiency, "tc": hw.skinny_tc_tflops * 1e12,
             "tf32": hw.tf32_tflops * 1e12, "fma": hw.cuda_core_tflops * 1e12}
    compute = sum(f / rates[unit] for unit, f in p.flops.items())
    compute += p.int_ops / (hw.int_tops * 1e12) + p.issue_ops / (hw.issue_tops * 1e12)
    compute = max(compute, p.side_issue_ops / (hw.issue_tops * 1e12))
    if p.programs:
        compute *= max(1.0, hw.sms / p.programs)  # idle SMs
    memory = p.bytes / (hw.hbm_tb_s * 1e12)
    atomics = (p.atomics.get("atom", 0) / (hw.atom_per_ns * 1e9)
               + p.atomics.get("red", 0) / (hw.red_per_ns * 1e9))
    return p.launches * hw.launch_us * 1e-6 + max(memory, compute) + atomics


def _lr_unit(c: Case, fp32_unit: str) -> str:
    return fp32_unit if c.adapter_bytes == 4 else "tc"


def _small(name: str, nbytes: float) -> Pass:
    return Pass(name, bytes=nbytes)


# --------------------------------------------------------------------------------------------
# Kernel sequences
# --------------------------------------------------------------------------------------------

def bare_linear(c: Case, code: Code, backward: bool) -> list:
    """Frozen nn.Linear: one cuBLAS GEMM forward; dx = G·W backward (no weight/bias grad)."""
    m, k, n, b = c.m, c.k, c.n, c.base_bytes
    seq = [Pass("F.linear", bytes=b * (m * k + n * k + m * n), flops={"gemm": 2 * m * n * k})]
    if backward:
        seq.append(Pass("dx = G·W", bytes=b * (m * n + n * k + m * k),
                        flops={"gemm": 2 * m * n * k}))
    return seq


def peft_lora(c: Case, code: Code, backward: bool) -> list:
    """PEFT's LoRA layer under bf16 autocast: base(x) + lora_B(lora_A(dropout(x))) * s, each an
    eager op; LoRA-FA freezes A, LoRA-XS adds an r x r matrix (negligible here)."""
    m, k, n, r, b = c.m, c.k, c.n, c.r, c.base_bytes
    seq = bare_linear(c, code, False)
    if c.dropout:
        seq.append(Pass("dropout(x)", bytes=m * k * (2 * b + 1),
                        int_ops=m * k * code.peft_rng_int_ops))
    seq += [Pass("lora_A", bytes=b * (m * k + m * r), flops={"tc": 2 * m * k * r}),
            Pass("lora_B", bytes=b * (m * r + m * n), flops={"tc": 2 * m * n * r}),
            Pass("* scaling", bytes=2 * b * m * n), Pass("y + lora", bytes=3 * b * m * n)]
    if c.method == "lora_xs":
        seq.insert(-3, Pass("· R (r x r)", bytes=2 * b * m * r, flops={"tc": 2 * m * r * r}))
    if not backward:
        return seq
    seq += [Pass("G * scaling", bytes=2 * b * m * n),
            Pass("dT = Gs·B", bytes=b * (m * n + m * r), flops={"tc": 2 * m * n * r}),
            Pass("dB = Gsᵀ·T", bytes=b * (m * n + m * r), flops={"tc": 2 * m * n * r})]
    if c.method == "lora":
        seq.append(Pass("dA = dTᵀ·xd", bytes=b * (m * k + m * r), flops={"tc": 2 * m * k * r}))
    seq.append(Pass("dxd = dT·A", bytes=b * (m * r + m * k), flops={"tc": 2 * m * k * r}))
    if c.dropout:
        seq.append(Pass("dropout bwd", bytes=m * k * (2 * b + 1)))
    seq += bare_linear(c, code, True)[1:]
    seq.append(Pass("dx + dxd", bytes=3 * b * m * k))
    return seq


QUANT_BLOCKSIZE = 64


def weight_bytes(c: Case) -> float:
    """HBM bytes of one read of W: dense in the base dtype, or 4-bit packed plus fp32 absmax."""
    if c.quant:
        return c.n * c.k * (0.5 + 4 / QUANT_BLOCKSIZE)
    return c.base_bytes * c.n * c.k


def dequant_ops(c: Case, code: Code) -> tuple:
    """(added, beside) instructions of one 4-bit GEMM (0, 0 for a dense W): the share of its
    dequantization added to its tensor-core time, and, for the share issued beside the tensor
    cores, that share plus the loop's own instructions (the pass takes the longer of the tensor
    cores and that issue time; Code.dequant_overlap)."""
    if not c.quant:
        return 0.0, 0.0
    elements = -(-c.m // code.dequant_block_m) * c.n * c.k
    overlap = code.dequant_overlap
    beside = elements * (code.dequant_ops * overlap + code.gemm_loop_ops) if overlap else 0.0
    return elements * code.dequant_ops * (1.0 - overlap), beside


def triton_backend(c: Case, code: Code, backward: bool) -> list:
    """backends/triton.py: project, fused_linear; grad_output_pass, grad_input, grad_a (4-bit:
    fused_linear_4bit and grad_input_4bit, W dequantized inside their K loops)."""
    m, k, n, r, b, a = c.m, c.k, c.n, c.r, c.base_bytes, c.adapter_bytes
    lr = _lr_unit(c, code.triton_fp32_adapter_unit)
    rng = m * k * code.rng_int_ops if c.dropout else 0
    four = "_4bit" if c.quant else ""
    seq = [Pass("project", bytes=b * m * k + a * (r * k + m * r), flops={lr: 2 * m * k * r},
                int_ops=rng),
           Pass("fused_linear" + four,
                bytes=b * (m * k + m * n) + weight_bytes(c) + a * (m * r + n * r),
                flops={"gemm": 2 * m * n * k, lr: 2 * m * n * r},
                issue_ops=dequant_ops(c, code)[0], side_issue_ops=dequant_ops(c, code)[1])]
    if not backward:
        return seq
    need_a = c.method == "lora"
    need_db = _needs_db(c, code)
    atomics = (m / code.triton_gop_block_m) * n * r if need_db else 0
    if need_db and (code.triton_db_memset or a == 4):
        seq.append(Pass("dB memset", bytes=4 * n * r))
    seq.append(Pass("grad_output_pass", bytes=b * m * n + a * (n * r + m * r) + 4 * m * r,
                    flops={lr: (4 if need_db else 2) * m * n * r},
                    atomics={code.triton_atomic: atomics}))
    if need_db and a != 4:  # fp32 adapters: .to is a no-op; a kept accumulator is re-zeroed
        kept = 0 if code.triton_db_memset else 4
        seq.append(_small("dB.to(dtype)" if code.triton_db_memset else "dB take",
                          (4 + a + kept) * n * r))
    seq.append(Pass("grad_input" + four,
                    bytes=b * (m * n + m * k) + weight_bytes(c) + 4 * m * r + a * r * k,
                    flops={"gemm": 2 * m * n * k, lr: 2 * m * k * r},
                    int_ops=rng, issue_ops=dequant_ops(c, code)[0],
                    side_issue_ops=dequant_ops(c, code)[1]))
    if need_a:
        column_blocks = -(-k // code.triton_grad_a_block_n)
        splits = max(1, min(-(-2 * 132 // column_blocks), m // 128)) if code.triton_grad_a_split_m else 1
        seq.append(Pass("grad_a", bytes=b * m * k + 4 * m * r + a * r * k + 4 * splits * r * k,
                        flops={code.triton_grad_a_unit: 2 * m * k * r}, int_ops=rng,
                        programs=column_blocks * splits))
        if splits > 1:
            seq.append(_small("dA partials sum", 4 * (splits + 1) * r * k))
    return seq


def cuda_backend(c: Case, code: Code, backward: bool) -> list:
    """backends/cuda.py: csrc rank passes + cuBLAS GEMMs through ATen."""
    m, k, n, r, b, a = c.m, c.k, c.n, c.r, c.base_bytes, c.adapter_bytes
    ru = _lr_unit(c, code.cuda_fp32_adapter_unit)
    # dA and the dropout term multiply dP (fp32) with x or A: on tensor cores over a 16-bit base
    grad_a_unit = code.cuda_grad_a_unit if b == 2 else "fma"
    term_unit = code.cuda_dropout_term_unit if b == 2 else "fma"
    rng = m * k * code.cuda_rng_int_ops if c.dropout else 0
    first = code.cuda_low_rank_first
    # beta = 1: the GEMM reads the low-rank term in its epilogue (bytes inside a compute-bound
    # pass); before, a separate addmm_ re-read and re-wrote the output
    epilogue = 1 if first else 0
    seq = [Pass("project", bytes=b * m * k + a * (r * k + m * r), flops={ru: 2 * m * k * r},
                int_ops=rng),
           Pass("P.to, B.T.to", bytes=(a + b) * (m * r + n * r), launches=2),
           Pass("y = s·P·B_effᵀ + bias" if first else "y.addmm_",
                bytes=b * ((1 if first else 2) * m * n + m * r + n * r),
                flops={"tc": 2 * m * n * r}),
           Pass("F.linear" + (" (beta = 1)" if first else ""),
                bytes=b * (m * k + n * k + (1 + epilogue) * m * n), flops={"gemm": 2 * m * n * k})]
    if not backward:
        return seq
    need_db = _needs_db(c, code)
    if need_db:
        seq.append(Pass("dB memset", bytes=4 * n * r))
    seq += [Pass("grad_output_pass", bytes=b * m * n + a * (n * r + m * r) + 4 * m * r,
                 flops={ru: (4 if need_db else 2) * m * n * r},
                 atomics={code.cuda_atomic: (m / code.cuda_gop_block_m) * n * r * need_db}),
            Pass("dx = G@W" + (" (beta = 1)" if first else ""),
                 bytes=b * (m * n + n * k + (1 + epilogue) * m * k), flops={"gemm": 2 * m * n * k})]
    if c.dropout:
        seq.append(Pass("dropped_low_rank" if first else "add_dropped_low_rank_",
                        bytes=b * (1 if first else 2) * m * k + 4 * m * r,
                        flops={term_unit: 2 * m * k * r}, int_ops=rng))
    else:
        seq.append(Pass("dx = dP·A" if first else "dx.addmm_",
                        bytes=b * ((1 if first else 2) * m * k + m * r + r * k),
                        flops={"tc": 2 * m * k * r}, launches=3))
    if c.method == "lora":
        seq.append(Pass("grad_a", bytes=b * m * k + 4 * m * r + 4 * r * k,
                        flops={grad_a_unit: 2 * m * k * r}, int_ops=rng))
        if a != 4:
            seq.append(_small("dA.to", (4 + a) * r * k))
    if need_db and a != 4:
        seq.append(_small("dB.to", (4 + a) * n * r))
    return seq


def _needs_db(c: Case, code: Code) -> bool:
    """Whether our backward reduces an N x r dB over M: LoRA and LoRA-FA train B; LoRA-XS (B
    frozen) takes dR from s·G·B instead, unless ``code.xs_db_eff``."""
    return c.method != "lora_xs" or code.xs_db_eff


def _with_latent(sequence):
    """LoRA-XS on our backends: B_eff = B·Rᵀ formed once per call; after the G pass (on B, not
    B_eff) dP = T·Rᵀ and dR = Pᵀ·T from its T = s·G·B (or dR = dB_effᵀ·B, ``xs_db_eff``)."""
    def wrapped(c: Case, code: Code, backward: bool) -> list:
        seq = sequence(c, code, backward)
        if c.method == "lora_xs":
            small = c.adapter_bytes * 2 * c.n * c.r
            seq.insert(0, Pass("B_eff = B·Rᵀ", bytes=small, flops={"tc": 2 * c.n * c.r * c.r}))
            if backward and code.xs_db_eff:
                seq.append(Pass("dR = dB_effᵀ·B", bytes=small,
                                flops={"tc": 2 * c.n * c.r * c.r}))
            elif backward:  # two r-wide products over fp32 M x r tensors
                rank_bytes = 4 * 3 * c.m * c.r
                seq.append(Pass("dP = T·Rᵀ", bytes=rank_bytes, flops={"tc": 2 * c.m * c.r ** 2}))
                seq.append(Pass("dR = Pᵀ·T", bytes=rank_bytes, flops={"tc": 2 * c.m * c.r ** 2}))
        return seq
    wrapped.__doc__ = sequence.__doc__
    return wrapped


BACKENDS = {"bare": bare_linear, "peft": peft_lora, "triton": _with_latent(triton_backend),
            "cuda": _with_latent(cuda_backend)}


# --------------------------------------------------------------------------------------------
# DoRA (magnitude-scaled LoRA): c = m / ‖W + s·B·A‖_row, y = c ⊙ (x·Wᵀ + s·P·Bᵀ) (+ bias);
# with dropout, PEFT's y = x·Wᵀ + (c − 1) ⊙ x̃·Wᵀ + c ⊙ s·P·Bᵀ. Methods "lora" and "lora_fa".
# --------------------------------------------------------------------------------------------

DORA_METHODS = ("lora", "lora_fa")


def peft_dora(c: Case, code: Code, backward: bool) -> list:
    """PEFT's DoRA layer (DoraLinearLayer.forward under bf16 autocast; every tensor counted in
    the base dtype, so its fp32 intermediates make this a lower bound): the base GEMM; B·A built
    densely through an identity matrix (lora_B(lora_A(eye(K)))) and the norm of W + s·B·A over
    N x K tensors each step; the low-rank branch; (c − 1) ⊙ base + c ⊙ lora · s over M x N
    elementwise passes, added to the base output. It keeps two M x N tensors (base result and
    lora result) for m's gradient. With dropout: x̃ = dropout(x), and the base term for the
    magnitude is a second full GEMM F.linear(x̃, W) (and a second dx GEMM in backward)."""
    m, k, n, r, b = c.m, c.k, c.n, c.r, c.base_bytes
    seq = bare_linear(c, code, False)                                # result = base(x)
    seq += [Pass("eye(K)", bytes=b * k * k),
            Pass("lora_A(eye)", bytes=b * (k * k + r * k + k * r), flops={"tc": 2 * k * k * r}),
            Pass("lora_B(·) = (B·A)ᵀ", bytes=b * (k * r + n * r + k * n),
                 flops={"tc": 2 * k * n * r}),
            Pass("s · B·A", bytes=2 * b * n * k), Pass("W + s·B·A", bytes=3 * b * n * k),
            Pass("norm(dim=1)", bytes=b * n * k + 4 * n), _small("m / norm", 3 * 4 * n)]
    if c.dropout:
        seq += [Pass("dropout(x)", bytes=m * k * (2 * b + 1),
                     int_ops=m * k * code.peft_rng_int_ops),
                Pass("F.linear(x̃, W)", bytes=b * (m * k + n * k + m * n),
                     flops={"gemm": 2 * m * n * k})]
    seq += [Pass("lora_A", bytes=b * (m * k + m * r), flops={"tc": 2 * m * k * r}),
            Pass("lora_B", bytes=b * (m * r + m * n), flops={"tc": 2 * m * n * r}),
            _small("c − 1", 2 * 4 * n),
            Pass("(c − 1) * base", bytes=2 * b * m * n), Pass("c * lora", bytes=2 * b * m * n),
            Pass("* scaling", bytes=2 * b * m * n), Pass("+ (result_dora)", bytes=3 * b * m * n),
            Pass("result + result_dora", bytes=3 * b * m * n)]
    if not backward:
        return seq
    # autograd in reverse: the products' gradients (G ⊙ factor) and dm's sums over M
    seq += [Pass("G * scaling", bytes=2 * b * m * n),
            Pass("dlora = Gs * c", bytes=2 * b * m * n),
            Pass("Gs * lora (dc)", bytes=3 * b * m * n), Pass("Σ_rows (dc)", bytes=b * m * n),
            Pass("dbase = G * (c − 1)", bytes=2 * b * m * n),
            Pass("G * base (dc)", bytes=3 * b * m * n), Pass("Σ_rows (dc')", bytes=b * m * n),
            _small("dm = dc / norm", 3 * 4 * n),
            Pass("dT = dlora·B", bytes=b * (m * n + m * r), flops={"tc": 2 * m * n * r}),
            Pass("dB = dloraᵀ·T", bytes=b * (m * n + m * r), flops={"tc": 2 * m * n * r})]
    if c.method == "lora":
        seq.append(Pass("dA = dTᵀ·x̃", bytes=b * (m * k + m * r), flops={"tc": 2 * m * k * r}))
    seq.append(Pass("dx̃ = dT·A", bytes=b * (m * r + m * k), flops={"tc": 2 * m * k * r}))
    if c.dropout:  # dbase goes through the second GEMM, x̃'s gradient through the mask
        seq += [Pass("dx̃ += dbase·W", bytes=b * (m * n + n * k + m * k),
                     flops={"gemm": 2 * m * n * k}),
                Pass("dx̃ + dx̃'", bytes=3 * b * m * k),
                Pass("dropout bwd", bytes=m * k * (2 * b + 1)),
                Pass("dx = G·W", bytes=b * (m * n + n * k + m * k),
                     flops={"gemm": 2 * m * n * k})]
    else:  # dbase joins G at the base result: one dx GEMM over the sum
        seq += [Pass("G + dbase", bytes=3 * b * m * n),
                Pass("dx = G'·W", bytes=b * (m * n + n * k + m * k),
                     flops={"gemm": 2 * m * n * k})]
    seq.append(Pass("dx + dx̃", bytes=3 * b * m * k))
    return seq


def fused_dora(c: Case, code: Code, backward: bool) -> list:
    """The fused DoRA design (issue 22's kernels): the factored row norm from cached terms of
    the frozen W (‖W_n‖², and W·Aᵀ while A is frozen), c applied in the GEMM's epilogue; y kept
    for dm (Z = y / c, no M x N tensor of its own). Backward: one pass over G and y with c on
    load gives dP = s·(c ⊙ G)·B, dB and dm = Σ_rows G ⊙ y / m (fp32 atomics per row block);
    dx = (c ⊙ G)·W + dP·A with c on load (K-extended as LoRA's). With dropout (PEFT's rule) the
    GEMMs carry a second accumulator over the same tiles: x̃·Wᵀ forward (written as Z for dm),
    ((c − 1) ⊙ G)·W backward, masked in the epilogue: twice the GEMM FLOPs, inherent to the rule.
    """
    m, k, n, r, b, a = c.m, c.k, c.n, c.r, c.base_bytes, c.adapter_bytes
    lr = _lr_unit(c, code.triton_fp32_adapter_unit)
    rng = m * k * code.rng_int_ops if c.dropout else 0
    train_a = c.method == "lora"
    # the norm: A·Aᵀ (r x r), then per row ‖W_n‖² + 2s·b_n·(A·W_nᵀ) + s²·b_n·(A·Aᵀ)·b_nᵀ; a
    # trainable A makes W·Aᵀ a fresh N x K x r product (one read of W)
    norm_bytes = 4 * n + 4 * n * r + a * r * k + a * n * r + 4 * n
    norm_flops = 2 * r * r * k + 4 * n * r * r
    if train_a:
        norm_bytes += b * n * k
        norm_flops += 2 * n * k * r
    seq = [Pass("DoRA norm, c" + (" (W·Aᵀ fresh)" if train_a else " (cached ‖W‖², W·Aᵀ)"),
                bytes=norm_bytes, flops={"tc": norm_flops})]
    write_xd = c.dropout and code.dora_write_dropped_x
    seq.append(Pass("project" + (" (+ x̃ written)" if write_xd else ""),
                    bytes=b * m * k * (2 if write_xd else 1) + a * (r * k + m * r),
                    flops={lr: 2 * m * k * r}, int_ops=rng))
    if c.dropout:
        mask_ops = 0 if write_xd else m * k * code.rng_int_ops * max(1, n // 128)
        seq.append(Pass("fused_linear, 2 accumulators (y, Z)",
                        bytes=b * (m * k * (2 if write_xd else 1) + n * k + 2 * m * n)
                        + a * (m * r + n * r) + 4 * n,
                        flops={"gemm": 4 * m * n * k, lr: 2 * m * n * r}, int_ops=mask_ops))
    else:
        seq.append(Pass("fused_linear (c in the epilogue)",
                        bytes=b * (m * k + n * k + m * n) + a * (m * r + n * r) + 4 * n,
                        flops={"gemm": 2 * m * n * k, lr: 2 * m * n * r}))
    if not backward:
        return seq
    blocks = m / code.dora_gop_block_m
    seq += [Pass("dB, dm memset", bytes=4 * (n * r + n)),
            Pass("grad_output_pass (c on load, dm)",
                 bytes=2 * b * m * n + a * (n * r + m * r) + 4 * m * r + 4 * n,
                 flops={lr: 4 * m * n * r, "fma": 2 * m * n},
                 atomics={code.triton_atomic: blocks * n * (r + 1)}),
            _small("dm / (c·norm)", 3 * 4 * n)]
    if c.dropout:
        seq.append(Pass("grad_input, 2 accumulators (G·W, ((c − 1) ⊙ G)·W)",
                        bytes=b * (m * n + n * k + m * k) + 4 * m * r + a * r * k + 4 * n,
                        flops={"gemm": 4 * m * n * k, lr: 2 * m * k * r}, int_ops=rng))
    else:
        seq.append(Pass("grad_input (c on load)",
                        bytes=b * (m * n + n * k + m * k) + 4 * m * r + a * r * k + 4 * n,
                        flops={"gemm": 2 * m * n * k, lr: 2 * m * k * r}))
    if train_a:
        seq.append(Pass("grad_a", bytes=b * m * k + 4 * m * r + a * r * k,
                        flops={code.triton_grad_a_unit: 2 * m * k * r}, int_ops=rng))
    return seq


DORA_BACKENDS = {"bare": bare_linear, "peft": peft_dora, "fused": fused_dora}


def predict_dora(backend: str, c: Case, code: Code, hw: Hardware, backward: bool) -> float:
    """Predicted seconds of one DoRA forward (or forward + backward): ``backend`` one of
    DORA_BACKENDS (bare: the frozen nn.Linear, the floor)."""
    return sum(pass_time(p, hw) for p in DORA_BACKENDS[backend](c, code, backward))


def dora_table(code: Code, hw: Hardware) -> str:
    """Markdown: fused DoRA and PEFT's DoRA against a bare frozen Linear, per case."""
    lines = ["| shape | r | method | dropout | bare fwd+bwd ms | PEFT DoRA ms | fused DoRA ms | "
             "fused fwd ×bare | fused fwd+bwd ×bare | PEFT fwd+bwd ×bare | PEFT / fused |",
             "|" + "---|" * 11]
    for label, mm, k, n in SHAPES:
        for r in RANKS:
            for method in DORA_METHODS:
                for dropout in (False, True):
                    c = Case(method, mm, k, n, r, dropout)
                    t = {(name, bwd): predict_dora(name, c, code, hw, bwd)
                         for name in DORA_BACKENDS for bwd in (False, True)}
                    lines.append(
                        f"| {label} | {r} | {method} | {'on' if dropout else 'off'} | "
                        f"{t['bare', True] * 1e3:.3f} | {t['peft', True] * 1e3:.3f} | "
                        f"{t['fused', True] * 1e3:.3f} | "
                        f"{t['fused', False] / t['bare', False]:.2f} | "
                        f"{t['fused', True] / t['bare', True]:.2f} | "
                        f"{t['peft', True] / t['bare', True]:.2f} | "
                        f"{t['peft', True] / t['fused', True]:.2f} |")
    return "\n".join(lines)


def predict(backend: str, c: Case, code: Code, hw: Hardware, backward: bool) -> float:
    """Predicted seconds of one forward (or forward + backward) of ``backend`` on ``c``."""
    efficiency = hw.triton_gemm_efficiency if backend == "triton" else 1.0
    return sum(pass_time(p, hw, efficiency) for p in BACKENDS[backend](c, code, backward))


def breakdown(backend: str, c: Case, code: Code, hw: Hardware, backward: bool) -> list:
    """[(pass name, seconds)] of one backend's sequence."""
    efficiency = hw.triton_gemm_efficiency if backend == "triton" else 1.0
    return [(p.name, pass_time(p, hw, efficiency)) for p in BACKENDS[backend](c, code, backward)]


def qlora_ratio(code: Code, hw: Hardware, m: int = 8192, k: int = 4096, n: int = 4096,
                r: int = 16, method: str = "lora_fa", dropout: bool = False) -> dict:
    """Issue 23's target: the fused 4-bit layer's fwd+bwd on the Triton backend over the same
    layer on a dense bf16 W (the dequantized weight), both predicted; the ratio with the
    dequantization added to the GEMMs' tensor-core time and issued beside it (each GEMM then
    takes the longer of the two; code.dequant_overlap 0 and 1): the range the measurement
    should fall in."""
    dense = predict("triton", Case(method, m, k, n, r, dropout), code, hw, True)
    out = {"dense_ms": dense * 1e3}
    for label, overlap in (("serial", 0.0), ("overlapped", 1.0)):
        four = predict("triton", Case(method, m, k, n, r, dropout, quant="nf4"),
                       replace(code, dequant_overlap=overlap), hw, True)
        out[f"4bit_{label}_ms"] = four * 1e3
        out[f"ratio_{label}"] = four / dense
    return out


def cases():
    for label, m, k, n in SHAPES:
        for r in RANKS:
            for method in METHODS:
                for dropout in (False, True):
                    yield label, Case(method, m, k, n, r, dropout)


def table(code: Code, hw: Hardware, after: Code | None = None, after_hw: Hardware | None = None
          ) -> str:
    """Markdown table of every case; with ``after``, each Triton/CUDA ratio as before → after."""
    head = ("| shape | r | method | dropout | pass | bare ms | PEFT ms | Triton ms | "
            "Triton ×bare | Triton ×PEFT | CUDA ×bare | CUDA ×PEFT |")
    lines = [head, "|" + "---|" * 12]
    for label, c in cases():
        for backward in (False, True):
            def row(cd, h):
                t = {name: predict(name, c, cd, h, backward) for name in BACKENDS}
                return t, (t["triton"] / t["bare"], t["triton"] / t["peft"],
                           t["cuda"] / t["bare"], t["cuda"] / t["peft"])
            t, ratios = row(code, hw)
            cells = [f"{x:.2f}" for x in ratios]
            if after is not None:
                _, new = row(after, after_hw or hw)
                cells = [f"{x:.2f} → {y:.2f}" for x, y in zip(ratios, new)]
            lines.append(f"| {label} | {c.r} | {c.method} | {'on' if c.dropout else 'off'} | "
                         f"{'fwd+bwd' if backward else 'fwd'} | {t['bare'] * 1e3:.3f} | "
                         f"{t['peft'] * 1e3:.3f} | {t['triton'] * 1e3:.3f} | " + " | ".join(cells)
                         + " |")
    return "\n".join(lines)


def compact_table(code: Code, hw: Hardware) -> str:
    """The README's table: fwd and fwd+bwd ratios per case, one row per (shape, r, method,
    dropout)."""
    lines = ["| shape | r | method | dropout | Triton fwd ×bare | Triton fwd+bwd ×bare | "
             "Triton fwd+bwd ×PEFT | CUDA fwd+bwd ×bare | CUDA fwd+bwd ×PEFT |",
             "|" + "---|" * 9]
    for label, c in cases():
        t = {(name, bwd): predict(name, c, code, hw, bwd) for name in BACKENDS
             for bwd in (False, True)}
        ratios = (t["triton", False] / t["bare", False], t["triton", True] / t["bare", True],
                  t["triton", True] / t["peft", True], t["cuda", True] / t["bare", True],
                  t["cuda", True] / t["peft", True])
        lines.append(f"| {label} | {c.r} | {c.method} | {'on' if c.dropout else 'off'} | "
                     + " | ".join(f"{x:.2f}" for x in ratios) + " |")
    return "\n".join(lines)


def _apply(settings, code: Code, hw: Hardware):
    """KEY=VALUE pairs onto copies of (code, hw), each key a field of one of them."""
    for item in settings:
        key, _, value = item.partition("=")
        for obj_name in ("code", "hw"):
            obj = code if obj_name == "code" else hw
            fields = {f.name: f for f in dataclasses.fields(obj)}
            if key in fields:
                kind = type(getattr(obj, key))
                parsed = (value.lower() in ("1", "true", "yes")) if kind is bool else kind(value)
                if obj_name == "code":
                    code = replace(code, **{key: parsed})
                else:
                    hw = replace(hw, **{key: parsed})
                break
        else:
            known = [f.name for f in dataclasses.fields(Code) + dataclasses.fields(Hardware)]
            raise SystemExit(f"--set/--after: unknown field {key!r}; expected one of {known}")
    return code, hw


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                        help="override a Hardware or Code field (e.g. triton_gemm_efficiency=0.9)")
    parser.add_argument("--after", nargs="*", metavar="KEY=VALUE",
                        help="quote a change: ratios shown as before → after")
    parser.add_argument("--breakdown", metavar="SHAPE,R,METHOD,DROPOUT",
                        help="per-pass times of one case, e.g. 4096²,16,lora_fa,0 (with "
                             "--dora: the DoRA sequences)")
    parser.add_argument("--markdown", metavar="PATH", help="also write the table there")
    parser.add_argument("--qlora", action="store_true",
                        help="issue 23's target: 4-bit LoRA-FA fwd+bwd at 8192 x 4096², r = 16 "
                             "over the same layer on a dense bf16 W")
    parser.add_argument("--compact", action="store_true",
                        help="one row per case, fwd and fwd+bwd ratios (the README's table)")
    parser.add_argument("--dora", action="store_true",
                        help="the DoRA table: fused DoRA and PEFT's DoRA against a bare Linear")
    args = parser.parse_args(argv)
    code, hw = _apply(args.set, Code(), Hardware())
    print("Assumptions:", hw)
    print("Kernel facts:", code)
    if args.qlora:
        ratio = qlora_ratio(code, hw)
        print("4-bit (NF4) LoRA-FA fwd+bwd, M = 8192, K = N = 4096, r = 16, Triton: "
              + ", ".join(f"{key} {value:.3f}" for key, value in ratio.items())
              + " (target: ratio <= 1.1)")
        c = Case("lora_fa", 8192, 4096, 4096, 16, False, quant="nf4")
        for name, seconds in breakdown("triton", c, code, hw, True):
            print(f"  {name:24s} {seconds * 1e6:9.1f} µs")
        return 0
    if args.breakdown:
        label, r, method, drop = args.breakdown.split(",")
        _, m, k, n = next(s for s in SHAPES if s[0] == label)
        c = Case(method, m, k, n, int(r), drop not in ("0", "off", "false"))
        backends = DORA_BACKENDS if args.dora else BACKENDS
        for backend in backends:
            print(f"\n{backend}:")
            for p in backends[backend](c, code, True):
                print(f"  {p.name:24s} {pass_time(p, hw) * 1e6:9.1f} µs")
        return 0
    after = _apply(args.after, code, hw) if args.after else (None, None)
    if args.dora:
        text = dora_table(code, hw)
    else:
        text = compact_table(code, hw) if args.compact else table(code, hw, *after)
    print(text)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
