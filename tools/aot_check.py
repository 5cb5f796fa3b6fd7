"""Ahead-of-time compile check of every Triton kernel for sm_90a and sm_80, no GPU needed.

    python -m tools.aot_check [--arch sm90,sm80] [--quick] [--every-target] [--only KERNELS]
                                   [--json PATH] [--report-only]

The kernel launches are discovered by running the Triton backend's forward and backward (and
DoRA's, ``dora_forward`` / ``dora_backward``: cases ``dora:fwd``, ``dora:bwd:*``) on meta
tensors with the kernels' ``launcher`` replaced by a recorder, so every kernel the backend calls,
with the exact arguments it passes, is compiled at every autotune config of its family in
triton_kernels/configs.py. One row per build: registers, spill bytes, shared memory, what the
dots became (wgmma / mma.sync / FMA), atomics (``red`` vs ``atom``), TMA. Both main-GEMM
variants are recorded (triton_kernels/variants.py: tiled, and the persistent TMA kernels, rows
``*_tma``, sm_90a only), and the 4-bit GEMMs (triton_kernels/quantized.py: rows
``fused_linear_4bit`` and ``grad_input_4bit``, cases ``4bit`` and ``4bit-nested``). Exit
status 1 on a compile error, a spill, shared memory over the limit, a dot off the tensor cores
or a TMA kernel without TMA instructions (0 with ``--report-only``). fp32 bases are built at both fp32 precisions (precision.dot_precision): an
"ieee" fp32 dot must stay on CUDA cores, with no TF32 instruction in its kernel; a "tf32" one
must become TF32 tensor-core instructions. Also prints the integer instructions the dropout
keep-mask adds per element in each kernel that draws it, and fails past MASK_BUDGET.

Compilation runs in freshly spawned worker processes with TRITON_INTERPRET=0 and an empty,
temporary Triton cache: the kernels must be compiled, not interpreted, and nothing is reused
from an earlier run.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import itertools
import json
import multiprocessing
import os
import re
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field

TARGETS = {"sm90": (90, 128), "sm80": (80, 64)}
SMEM_LIMIT = {"sm90": 227 * 1024, "sm80": 163 * 1024}
BASE_DTYPES = ("bfloat16", "float16", "float32")
# What fp32 dots run as (precision.dot_precision, from torch's TF32 setting): both are built.
FP32_PRECISIONS = ("ieee", "tf32")
ADAPTER_DTYPES = ("bfloat16", "float16", "float32")
RANKS = (1, 16, 64, 128)
DROPOUT = (0.0, 0.1)
# M, K, N of the launches (the LLaMA-7B projection shape the design budget uses).
SHAPE = (8192, 4096, 4096)
# Backward variants: (name, need_a, need_bias, deterministic). LoRA-XS launches what LoRA-FA does.
BACKWARD_VARIANTS = (("lora", True, True, False), ("lora_fa", False, False, False),
                     ("deterministic", True, True, True))
# Main-GEMM variants (triton_kernels/variants.py): each forward/backward is recorded with each.
GEMM_VARIANTS = ("tiled", "tma")
# Config families compiled only for some targets, and why the others are skipped.
TARGET_ONLY = {"gemm_tma": ("sm90", "TMA tensor descriptors need sm_90 or later")}


@dataclass
class Build:
    """One compiled (kernel, target, config, arguments) and what ptxas made of it."""
    kernel: str
    target: str
    case: str
    config: str
    error: str = ""
    registers: int = -1
    spill_bytes: int = 0
    shared_bytes: int = 0
    dots: dict = field(default_factory=dict)  # wgmma / mma / fma: tl.dot sites by lowering
    ptx: dict = field(default_factory=dict)  # instruction counts in the PTX
    problems: list = field(default_factory=list)


# ---------------------------------------------------------------------------------------------
# Discovery (runs inside a worker: imports the kernels)
# ---------------------------------------------------------------------------------------------

def _kernel_modules():
    import lowrank_fused.triton_kernels as package
    import importlib
    import pkgutil
    return [importlib.import_module(f"{package.__name__}.{m.name}")
            for m in pkgutil.iter_modules(package.__path__)]


def _arg_spec(value):
    """A launch argument as picklable data: tensors become their dtype."""
    import torch
    if isinstance(value, torch.Tensor):
        return ("tensor", str(value.dtype).removeprefix("torch."))
    return ("value", value)


@contextlib.contextmanager
def deterministic_algorithms(flag: bool):
    """torch.use_deterministic_algorithms(flag) for the block, then restored."""
    import torch
    was = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(flag)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(was)


@contextlib.contextmanager
def fp32_matmul_precision(precision: str):
    """torch's fp32 matmul precision ("ieee" or "tf32", what precision.dot_precision reads) set
    for the block, then restored: the fp32_precision API where torch has it, else allow_tf32."""
    import torch
    matmul = torch.backends.cuda.matmul
    if hasattr(torch.backends, "fp32_precision"):
        name, value = "fp32_precision", precision
    else:
        name, value = "allow_tf32", precision == "tf32"
    saved = getattr(matmul, name)
    setattr(matmul, name, value)
    try:
        yield
    finally:
        setattr(matmul, name, saved)


def record_launches(base: str, adapter: str, rank: int, p_drop: float,
                    fp32_precision: str = "ieee"):
    """[(module, kernel name, family, args, kwargs, case)] the Triton backend launches for one
    forward and each backward variant, on meta tensors (nothing runs), with fp32 dots at
    ``fp32_precision``."""
    import torch
    from lowrank_fused.backends import triton as backend
    from lowrank_fused.dropout import DropoutSpec
    from lowrank_fused.triton_kernels import variants

    launches = []  # the same skinny launches twice (one per GEMM variant): _plan dedupes

    class Recorder:
        def __init__(self, kernel, family):
            self.kernel, self.family = kernel, family

        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                launches.append((self.kernel.fn.__module__, self.kernel.fn.__name__, self.family,
                                 [_arg_spec(a) for a in args],
                                 {k: _arg_spec(v) for k, v in kwargs.items()}))
            return launch

    def fake_launcher(kernel, family, *args, **kwargs):
        return Recorder(kernel, family), {}

    m, k, n = SHAPE
    dt = lambda name: getattr(torch, name)  # noqa: E731
    meta = dict(device="meta")
    x = torch.empty((m, k), dtype=dt(base), **meta)
    weight = torch.empty((n, k), dtype=dt(base), **meta)
    bias = torch.empty((n,), dtype=dt(base), **meta)
    lora_a = torch.empty((rank, k), dtype=dt(adapter), **meta)
    lora_b = torch.empty((n, rank), dtype=dt(adapter), **meta)
    dropout = DropoutSpec(p=p_drop, seed=1234) if p_drop else None
    patched = [mod for mod in _kernel_modules() if hasattr(mod, "launcher")]
    saved = [mod.launcher for mod in patched]
    saved_variant = os.environ.get(variants.ENV)
    cases = []
    try:
        for mod in patched:
            mod.launcher = fake_launcher
        with fp32_matmul_precision(fp32_precision):
            for gemm in GEMM_VARIANTS:
                os.environ[variants.ENV] = gemm
                before = len(launches)
                _, p = backend.forward(x, weight, bias, lora_a, lora_b, 2.0, dropout)
                cases += ["fwd"] * (len(launches) - before)
                for name, need_a, need_bias, deterministic in BACKWARD_VARIANTS:
                    before = len(launches)
                    with deterministic_algorithms(deterministic):
                        backend.backward(torch.empty((m, n), dtype=dt(base), **meta), x, p, weight,
                                         lora_a, lora_b, 2.0, dropout, need_x=True, need_a=need_a,
                                         need_b=True, need_bias=need_bias)
                    cases += [f"bwd:{name}"] * (len(launches) - before)
            # DoRA (triton_kernels/dora.py; one GEMM variant, tiled): forward with Z kept, each
            # backward variant with m trainable
            os.environ[variants.ENV] = "tiled"
            cases += _record_dora(backend, launches, x, weight, bias, lora_a, lora_b, dropout,
                                  dt(base))
            # The 4-bit GEMMs (triton_kernels/quantized.py), plain and nested absmax: W as
            # bitsandbytes packs it, computing in the base dtype
            from lowrank_fused.triton_kernels import quantized as kernels_4bit
            dp = torch.empty((m, rank), dtype=torch.float32, **meta)
            seed, p_4bit = (dropout.seed, dropout.quantised_p) if dropout else (0, 0.0)
            for nested in (False, True):
                packed = packed_4bit_on_meta(n, k, dt(base), nested)
                label = "4bit-nested" if nested else "4bit"
                before = len(launches)
                kernels_4bit.fused_linear_4bit(x, packed, bias, p, lora_b, 2.0)
                cases += [f"fwd:{label}"] * (len(launches) - before)
                before = len(launches)
                kernels_4bit.grad_input_4bit(torch.empty((m, n), dtype=dt(base), **meta), packed,
                                             dp, lora_a, seed, p_4bit)
                cases += [f"bwd:{label}"] * (len(launches) - before)
    finally:
        for mod, launcher in zip(patched, saved):
            mod.launcher = launcher
        if saved_variant is None:
            os.environ.pop(variants.ENV, None)
        else:
            os.environ[variants.ENV] = saved_variant
    return [(*launch, case) for launch, case in zip(launches, cases)]


def _record_dora(backend, launches, x, weight, bias, lora_a, lora_b, dropout, base_dtype):
    """The case labels of the DoRA launches appended to ``launches`` by one forward and each
    backward variant of the Triton backend's DoRA (meta tensors)."""
    import torch
    m, n = x.shape[0], weight.shape[0]
    scale = torch.empty((n,), dtype=torch.float32, device="meta")
    cases, before = [], len(launches)
    _, p, z = backend.dora_forward(x, weight, bias, lora_a, lora_b, 2.0, dropout, scale,
                                   need_z=True)
    cases += ["dora:fwd"] * (len(launches) - before)
    for name, need_a, need_bias, deterministic in BACKWARD_VARIANTS:
        before = len(launches)
        with deterministic_algorithms(deterministic):
            backend.dora_backward(torch.empty((m, n), dtype=base_dtype, device="meta"), x, p, z,
                                  weight, lora_a, lora_b, None, 2.0, dropout, scale, scale,
                                  need_x=True, need_a=need_a, need_b=True, need_latent=False,
                                  need_bias=need_bias, need_m=True)
        cases += [f"dora:bwd:{name}"] * (len(launches) - before)
    return cases


def packed_4bit_on_meta(n: int, k: int, dtype, nested: bool, blocksize: int = 64):
    """A ``quantized.Packed4bit`` of meta tensors: an (n, k) NF4 weight as bitsandbytes packs it
    (nested: its absmax 8-bit, blocks of 256)."""
    import torch
    from lowrank_fused.quantized import Packed4bit
    meta = dict(device="meta")
    blocks = -(-n * k // blocksize)
    fp32 = lambda size: torch.empty((size,), dtype=torch.float32, **meta)  # noqa: E731
    extra = dict(code2=fp32(256), absmax2=fp32(-(-blocks // 256)), offset=fp32(1),
                 blocksize2=256) if nested else {}
    return Packed4bit(data=torch.empty((-(-n * k // 2),), dtype=torch.uint8, **meta),
                      code=fp32(16),
                      absmax=(torch.empty((blocks,), dtype=torch.uint8, **meta) if nested
                              else fp32(blocks)),
                      blocksize=blocksize, n=n, k=k, quant_type="nf4", dtype=dtype, **extra)


def family_configs(family: str, generation: str, base: str = "bfloat16", rank_block: int = 16,
                   dropout: bool = False):
    """The autotune configs the launcher offers ``family`` on ``generation`` for a base dtype,
    rank block and dropout, as plain dicts: the configs the autotuner sees after its pruning;
    none where the family has no configs for ``generation`` (TARGET_ONLY)."""
    import torch
    from lowrank_fused.triton_kernels import configs, fit
    table = configs.CONFIGS[family]
    if generation not in table:
        return []
    offered = fit.fitting_configs(table[generation], family, getattr(torch, base).itemsize,
                                  rank_block, SMEM_LIMIT[generation], generation, dropout)
    return [dict(c.kwargs, num_warps=c.num_warps, num_stages=c.num_stages) for c in offered]


# ---------------------------------------------------------------------------------------------
# Compilation and inspection
# ---------------------------------------------------------------------------------------------

def _compile(module: str, name: str, args, kwargs, generation: str):
    """triton.compile of one launch exactly as the runtime would specialise it, for a target."""
    import importlib
    import torch
    import triton
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import MockTensor, create_function_from_signature

    kernel = getattr(importlib.import_module(module), name)
    capability, warp_size = TARGETS[generation]
    target = GPUTarget("cuda", capability, warp_size)
    backend = make_backend(target)
    unpack = lambda s: MockTensor(getattr(torch, s[1])) if s[0] == "tensor" else s[1]  # noqa
    args = [unpack(a) for a in args]
    kwargs = {k: unpack(v) for k, v in kwargs.items()}
    kwargs.setdefault("debug", False)
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    bound, specialization, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = kernel._pack_args(backend, kwargs, bound,
                                                              specialization, options)
    knobs.nvidia.dump_ptxas_log = True
    log = io.StringIO()
    with contextlib.redirect_stdout(log):
        compiled = triton.compile(ASTSource(kernel, signature, constexprs, attrs), target=target,
                                  options=options.__dict__)
    return compiled, log.getvalue()


_DOT = re.compile(r"=\s*(tt\.dot|ttng\.warp_group_dot)\b.*?(?:tensor|memdesc)<(?:\d+x)+(\w+)[,>]"
                  r".*->\s*tensor<[^>]*#(\w+)")


def classify_dots(ttgir: str) -> dict:
    """tl.dot sites by what they lowered to: wgmma (warp_group_dot), mma (mma.sync: an #mma
    result layout) or fma (any other layout: CUDA cores); and the dots on fp32 operands among
    them, on tensor cores (fp32_tc: TF32) or on CUDA cores (fp32_fma)."""
    counts = {"wgmma": 0, "mma": 0, "fma": 0, "fp32_tc": 0, "fp32_fma": 0}
    for op, operand, layout in _DOT.findall(ttgir):
        if op == "ttng.warp_group_dot":
            lowering = "wgmma"
        elif layout.startswith("mma"):
            lowering = "mma"
        else:
            lowering = "fma"
        counts[lowering] += 1
        if operand == "f32":
            counts["fp32_fma" if lowering == "fma" else "fp32_tc"] += 1
    return counts


def fp32_precision_of(kwargs) -> str:
    """The precision a launch asked of its fp32 dots: "ieee" if any precision constexpr says so
    (precision.dot_precision gives it to fp32 dots only), else "tf32"."""
    return "ieee" if ("value", "ieee") in kwargs.values() else "tf32"


def dot_problems(dots: dict, ptx: dict, fp32_precision: str) -> list:
    """What is wrong with where a kernel's dots run: a 16-bit dot on CUDA cores; an "ieee" fp32
    dot on tensor cores or any TF32 instruction beside it; a "tf32" fp32 dot on CUDA cores, or
    fp32 dots with no TF32 instruction."""
    problems = []
    half_on_fma = dots["fma"] - dots["fp32_fma"]
    if half_on_fma:
        problems.append(f"{half_on_fma} 16-bit dot(s) on CUDA cores")
    if fp32_precision == "ieee":
        if dots["fp32_tc"]:
            problems.append(f"{dots['fp32_tc']} ieee fp32 dot(s) on tensor cores")
        if ptx["tf32"]:
            problems.append(f"{ptx['tf32']} TF32 instruction(s) in an ieee kernel")
    else:
        if dots["fp32_fma"]:
            problems.append(f"{dots['fp32_fma']} tf32 dot(s) on CUDA cores")
        if dots["fp32_tc"] and not ptx["tf32"]:
            problems.append("tf32 dots without a TF32 instruction")
    return problems


def count_ptx(ptx: str) -> dict:
    """Instruction counts that tell how the kernel runs."""
    count = lambda pattern: len(re.findall(pattern, ptx, re.M))  # noqa: E731
    return {"wgmma": count(r"^\s*wgmma\.mma_async"), "mma_sync": count(r"^\s*mma\.sync"),
            "tf32": count(r"^\s*(?:wgmma\.mma_async|mma\.sync)\S*\.tf32"),
            "fma_f32": count(r"^\s*fma\.rn\.f32"), "red": count(r"^\s*(?:@%p\d+\s+)?red\."),
            "atom": count(r"^\s*(?:@%p\d+\s+)?atom\."),
            "tma": count(r"cp\.async\.bulk\.tensor"),
            "cp_async": count(r"^\s*(?:@%p\d+\s+)?cp\.async\.")}


def parse_ptxas_log(log: str) -> tuple[int, int]:
    """(registers, spill store bytes) from ``ptxas -v``."""
    regs = re.search(r"Used (\d+) registers", log)
    spills = re.search(r"(\d+) bytes spill stores", log)
    return (int(regs.group(1)) if regs else -1, int(spills.group(1)) if spills else 0)


def check_build(job) -> Build:
    module, name, family, args, kwargs, case, generation, config = job
    cfg = ",".join(f"{k}={v}" for k, v in config.items())
    build = Build(kernel=name.strip("_").removesuffix("_kernel"), target=generation, case=case,
                  config=cfg)
    try:
        compiled, log = _compile(module, name, args, {**kwargs, **{
            k: ("value", v) for k, v in config.items()}}, generation)
    except Exception as exc:  # noqa: BLE001  (every failure becomes a row)
        build.error = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0][:200]}"
        build.problems.append("compile error")
        return build
    build.registers, build.spill_bytes = parse_ptxas_log(log)
    build.shared_bytes = int(compiled.metadata.shared)
    build.dots = classify_dots(compiled.asm["ttgir"])
    build.ptx = count_ptx(compiled.asm["ptx"])
    if build.spill_bytes:
        build.problems.append(f"spills {build.spill_bytes} B")
    if build.shared_bytes > SMEM_LIMIT[generation]:
        build.problems.append(f"smem {build.shared_bytes // 1024} KB > "
                              f"{SMEM_LIMIT[generation] // 1024} KB")
    build.problems += dot_problems(build.dots, build.ptx, fp32_precision_of(kwargs))
    if family == "gemm_tma" and not build.ptx["tma"]:
        build.problems.append("no TMA (cp.async.bulk.tensor) in a TMA kernel")
    return build


# ---------------------------------------------------------------------------------------------
# The dropout mask's cost
# ---------------------------------------------------------------------------------------------

_INT_OPS = re.compile(r"^\s*(?:@!?%p\d+\s+)?(mul|mad|add|sub|xor|and|or|not|shl|shr|shf|lop3|"
                      r"prmt|bfe|bfi|min|max|setp|selp|cvt|mul24|mad24|mulhi)\.[\w.]*"
                      r"(?:[us](?:8|16|32|64)|b(?:8|16|32|64)|pred)\b", re.M)


_SASS_INT = re.compile(r"^\s*/\*[0-9a-f]+\*/\s+(?:@!?U?P\w+\s+)?(IMAD|IADD3|IADD|LOP3|LOP|SHF|SHL|"
                       r"SHR|PRMT|ISETP|SEL|IMNMX|VIMNMX|LEA|I2F|I2FP|F2I|IABS|POPC|FLO|BMSK|"
                       r"SGXT|IMUL|IMNMX|UIMAD|UIADD3|ULOP3|USHF|ULEA|USEL|UISETP|UPRMT)\b", re.M)


def sass_integer_instructions(cubin: bytes) -> int:
    """Integer-pipe SASS instructions (IMAD, IADD3, LOP3, SHF, ...) in a cubin, via the
    cuobjdump that ships with Triton; -1 where it is missing."""
    import subprocess
    from triton import knobs
    tool = os.path.join(os.path.dirname(knobs.nvidia.ptxas.path), "cuobjdump")
    if not os.path.exists(tool):
        return -1
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        sass = subprocess.run([tool, "-sass", f.name], capture_output=True, text=True).stdout
    return len(_SASS_INT.findall(sass))


# What the mask may add per element in a kernel that draws it (issue 11's budget; Philox ~64).
MASK_BUDGET = 12
# The kernels that draw the mask, the launch case that holds them, and whether their mask work
# sits in the streamed loop (counted once per loop iteration) or once per output tile.
MASK_KERNELS = {"_project_kernel": ("fwd", True), "_grad_a_kernel": ("bwd:lora", True),
                "_grad_input_kernel": ("bwd:lora", False)}


def _launch_of(launches, name, case):
    return next((l for l in launches if l[1] == name and l[5] == case), None)


def mask_instructions(generation: str = "sm90") -> dict:
    """Integer SASS instructions the dropout mask adds per element in each kernel that draws it:
    the kernel compiled with dropout minus the same launch without, at the first config of its
    family (bf16, r = 16), over the elements one thread covers in one pass of the code that
    holds the mask (a loop iteration of the P pass and dA, the output tile of dx). This counts
    everything dropout brings (hash, halves, scaling, extra addressing): an upper bound of the
    hash's own cost. Also the PTX count, for comparison with older figures."""
    with_mask = record_launches("bfloat16", "bfloat16", 16, 0.1)
    without = record_launches("bfloat16", "bfloat16", 16, 0.0)
    kernels = {}
    for name, (case, in_loop) in MASK_KERNELS.items():
        on, off = _launch_of(with_mask, name, case), _launch_of(without, name, case)
        if on is None or off is None:
            return {"error": f"no {case} launch of {name} recorded"}
        family = on[2]
        config = family_configs(family, generation, "bfloat16", 16, True)[0]
        counts = []
        for module, kname, _, args, kwargs, _ in (on, off):
            compiled, _ = _compile(module, kname, args, {**kwargs, **{
                k: ("value", v) for k, v in config.items()}}, generation)
            counts.append((sass_integer_instructions(compiled.asm["cubin"]),
                           len(_INT_OPS.findall(compiled.asm["ptx"]))))
        # the masked tile: BLOCK_M rows x BLOCK_N columns (of x, or of dx) in every such kernel
        per_thread = config["BLOCK_M"] * config["BLOCK_N"] / (config["num_warps"] * 32)
        (sass_on, ptx_on), (sass_off, ptx_off) = counts
        kernels[name.strip("_").removesuffix("_kernel")] = {
            "config": ",".join(f"{k}={v}" for k, v in config.items()),
            "per": "loop iteration" if in_loop else "output tile",
            "elements_per_thread": per_thread,
            "sass_added": sass_on - sass_off if sass_on >= 0 else None,
            "sass_per_element": round((sass_on - sass_off) / per_thread, 1)
            if sass_on >= 0 else None,
            "ptx_per_element": round((ptx_on - ptx_off) / per_thread, 1)}
    worst = max((k["sass_per_element"] if k["sass_per_element"] is not None
                 else k["ptx_per_element"]) for k in kernels.values())
    return {"kernels": kernels, "worst_per_element": worst, "budget": MASK_BUDGET}


def format_mask(mask: dict) -> str:
    if "error" in mask:
        return f"dropout keep-mask: could not measure: {mask['error']}"
    lines = [f"dropout keep-mask, sm_90a: integer instructions it adds per element "
             f"(budget {mask['budget']}; Philox tl.rand ~64)",
             "| kernel | config | counted per | elements/thread | SASS added | SASS/element | "
             "PTX/element |", "|---|---|---|---|---|---|---|"]
    for name, k in mask["kernels"].items():
        lines.append(f"| {name} | {k['config']} | {k['per']} | {k['elements_per_thread']:g} | "
                     f"{k['sass_added']} | {k['sass_per_element']} | {k['ptx_per_element']} |")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Driver
# ---------------------------------------------------------------------------------------------

# Grid points (base dtype, adapter dtype, r, dropout p) per mode. CI's default covers every
# adapter dtype, rank edge and dropout at the bf16 base, one fp16 base; --full is the product.
DEFAULT_POINTS = [("bfloat16", a, r, p) for a in ADAPTER_DTYPES for r in (16, 64) for p in DROPOUT]
DEFAULT_POINTS += [("bfloat16", "bfloat16", 1, 0.1), ("bfloat16", "float32", 128, 0.1),
                   ("float16", "float16", 128, 0.1)]
# fp32 bases (configs.FP32_CONFIGS): tf32 dots at the widest rank, with dropout, on every target
# (sm_80's mma.sync differs) and every config. Left out until it is clean: ieee (CUDA-core dots),
# which still spills in some builds at r = 64 and 128 (the pass over G with dB, dx with dropout,
# up to 7.8 KB); --full builds it.
FP32_POINTS = [("float32", "float32", 128, 0.1, "tf32")]
QUICK_POINTS = [("bfloat16", "float32", 16, 0.1), ("float16", "bfloat16", 64, 0.0)]


def _plan(args) -> list:
    """Every (launch, target, config) job, deduplicated: sm90 at every config of each point,
    other targets at a sample of points and the first two configs; the fp32 points at every
    config on every target. Kernels a target cannot run go to ``args.skipped`` as (kernel,
    target, reason)."""
    fp32_points = []
    if args.quick:
        points = QUICK_POINTS
    elif args.full:
        points = list(itertools.product(BASE_DTYPES, ADAPTER_DTYPES, RANKS, DROPOUT))
        points += [(*point, "tf32") for point in points if point[0] == "float32"]
    else:
        points, fp32_points = DEFAULT_POINTS, FP32_POINTS
    jobs, seen = [], set()
    for generation in args.arch:
        primary = (generation == "sm90" or args.every_target) and not args.quick
        sample = points if primary else points[::max(1, len(points) // 4)]
        for point in sample + fp32_points:
            every_config = primary or point in fp32_points
            for module, name, family, a, kw, case in record_launches(*point):
                row = name.strip("_").removesuffix("_kernel")
                if args.only and row not in args.only:
                    continue
                if family in TARGET_ONLY and generation not in TARGET_ONLY[family]:
                    args.skipped.add((row, generation, TARGET_ONLY[family][1]))
                    continue
                rank_block = kw.get("RANK_BLOCK", ("value", 16))[1]
                dropout = bool(kw.get("HAS_DROPOUT", ("value", False))[1])
                configs = family_configs(family, generation, point[0], rank_block, dropout)
                for config in configs if every_config else configs[:2]:
                    key = (name, generation, repr(a), repr(sorted(kw.items())), repr(config))
                    if key in seen:  # identical compile, e.g. LoRA-FA's pass in LoRA's
                        continue
                    seen.add(key)
                    precision = f" {(*point, 'ieee')[4]}" if point[0] == "float32" else ""
                    label = (f"{case} {point[0][:4]}/{point[1][:4]} r={point[2]} p={point[3]}"
                             f"{precision}")
                    jobs.append((module, name, family, a, kw, label, generation, config))
    return jobs


def _worker_init():
    os.environ["TRITON_INTERPRET"] = "0"  # compile, never interpret
    os.environ["TRITON_ALWAYS_COMPILE"] = "1"  # every build runs ptxas: its log is the data


def _run(args):
    _worker_init()
    jobs = _plan(args)
    print(f"aot_check: {len(jobs)} builds on {args.jobs} processes", file=sys.stderr, flush=True)
    with multiprocessing.get_context("spawn").Pool(args.jobs, initializer=_worker_init) as pool:
        builds = []
        for build in pool.imap(check_build, jobs, chunksize=2):
            builds.append(build)
            if len(builds) % 50 == 0:
                print(f"aot_check: {len(builds)}/{len(jobs)}", file=sys.stderr, flush=True)
        try:
            mask = pool.apply(mask_instructions, ("sm90",))
        except Exception as exc:  # noqa: BLE001  (reported, and fails the check)
            mask = {"error": f"{type(exc).__name__}: {str(exc).strip()[:200]}"}
    return builds, mask


def format_table(builds) -> str:
    lines = ["| kernel | target | case | config | regs | spill B | smem KB | dots w/m/f | "
             "wgmma/mma.sync/fma.f32 (PTX) | red/atom | TMA | problems |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for b in builds:
        d, p = b.dots, b.ptx
        lines.append(
            f"| {b.kernel} | {b.target} | {b.case} | {b.config} | {b.registers} | "
            f"{b.spill_bytes} | {b.shared_bytes / 1024:.0f} | "
            f"{d.get('wgmma', '-')}/{d.get('mma', '-')}/{d.get('fma', '-')} | "
            f"{p.get('wgmma', '-')}/{p.get('mma_sync', '-')}/{p.get('fma_f32', '-')} | "
            f"{p.get('red', '-')}/{p.get('atom', '-')} | {p.get('tma', '-')} | "
            f"{'; '.join(b.problems) or 'ok'}{' ' + b.error if b.error else ''} |")
    return "\n".join(lines)


def summarize(builds) -> str:
    by_kernel = {}
    for b in builds:
        total, bad = by_kernel.get((b.kernel, b.target), (0, 0))
        by_kernel[(b.kernel, b.target)] = (total + 1, bad + bool(b.problems))
    return "\n".join(f"{k} {t}: {bad} of {total} builds with problems"
                     for (k, t), (total, bad) in sorted(by_kernel.items()))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", default="sm90,sm80",
                        help="comma-separated targets among sm90 (sm_90a), sm80")
    parser.add_argument("--quick", action="store_true",
                        help="2 dtype/rank/dropout points, 2 configs per kernel (seconds)")
    parser.add_argument("--full", action="store_true",
                        help="every base x adapter dtype x r x dropout point (tens of minutes)")
    parser.add_argument("--only", default="", metavar="KERNELS",
                        help="comma-separated kernel rows to build, e.g. fused_linear_tma,"
                             "grad_input_tma (default: all)")
    parser.add_argument("--json", metavar="PATH", help="also write every row as JSON")
    parser.add_argument("--jobs", type=int, default=2, help="compile processes (default 2)")
    parser.add_argument("--every-target", action="store_true",
                        help="every point and config on every target, not a sample off sm_90a")
    parser.add_argument("--report-only", action="store_true",
                        help="print the findings but exit 0 (until the kernels are clean)")
    args = parser.parse_args(argv)
    args.only = {k.strip() for k in args.only.split(",") if k.strip()}
    args.arch = [a.strip().replace("sm_90a", "sm90").replace("sm_80", "sm80")
                 for a in args.arch.split(",")]
    unknown = [a for a in args.arch if a not in TARGETS]
    if unknown:
        parser.error(f"--arch: expected targets among {sorted(TARGETS)}, got {unknown}")
    args.skipped = set()
    cache = tempfile.mkdtemp(prefix="aot_check_cache_")
    os.environ["TRITON_CACHE_DIR"] = cache  # inherited by the spawned workers
    start = time.time()
    try:
        builds, mask = _run(args)
    finally:
        shutil.rmtree(cache, ignore_errors=True)
    print(format_table(builds))
    print()
    print(summarize(builds))
    for kernel, generation, reason in sorted(args.skipped):
        print(f"{kernel} {generation}: skipped ({reason})")
    print()
    print(format_mask(mask))
    mask_failed = "error" in mask or mask["worst_per_element"] > MASK_BUDGET
    failed = [b for b in builds if b.problems] + (["mask"] if mask_failed else [])
    print(f"\n{len(builds)} builds, {len(failed)} with problems, {time.time() - start:.0f} s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"builds": [asdict(b) for b in builds], "mask": mask}, f, indent=1)
    if failed and not args.report_only:
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
