"""The speed figures of a GPU session, each beside tools.model's prediction.

    python -m tools.probe --out PATH.json [--budget-s 230] [--groups PREFIX,...] [--quick]

``plan`` lists the groups in the order tools.first's speed step runs them (most decisive
first), each with its estimated seconds on an H100 (quick autotuning, the correctness step's
kernels already compiled; every group also records what it took):

1. the matrix, at (4096², r = 16), (4096→11008, r = 16), (4096², r = 64), (4096→11008, r = 64),
   M = 8192, bf16 base, fp32 adapters, dropout off, under bf16 autocast: LoRA, LoRA-FA, LoRA-XS,
   DoRA, DoRA-FA and QLoRA (NF4 with nested absmax; LoRA and LoRA-FA), forward and
   forward+backward, ours (LowRankLinear on Triton; on CUDA C++ too for the plain methods where
   lowrank_fused._C loads) against the bare frozen nn.Linear (for QLoRA also a frozen
   bitsandbytes Linear4bit) and PEFT doing the same method (PEFT's LoRA of the same rank stands
   in for LoRA-XS, which PEFT lacks: its rows say so);
2. calibration: 4096², r = 16, LoRA-FA under full autotuning, tiled and TMA GEMMs, against the
   same layer under quick: tuned ÷ quick, the margin of the matrix's quick figures;
3. the 4096², r = 16 matrix with dropout on;
4. the Triton main GEMMs against cuBLAS, with a device-to-device copy (the bandwidth ceiling);
5. the per-kernel breakdown of LoRA at 4096², r = 16;
6. the model benchmark's BERT case (tools/model_level.py): PEFT against enable_fused;
7. the cold and the warm first training step of a 2-layer LLaMA-7B-wide model under "auto"
   and full autotuning (what each step timed: the warm one, a second process's view, nothing),
   and ``lowrank_fused.tuning_report()``: past the first call's budget, run by a later call.

Timing is tools.timing's: CUDA events, L2 flushed, warm-ups, contenders interleaved
round-robin, p20 / p50 / p80, gradients set to None before every call, B random and non-zero.
In a matrix group ours is built and run first, then each contender in its own try: a contender
that fails leaves a row saying why and the others go on; a CUDA error (sticky: it poisons the
process) ends the step with a row naming the case (``FatalCudaError``). Each group times the bare
layer alone at its start and at its end: the drift between the two is the group's noise figure.

Without CUDA it is a dry run: the same code on tiny CPU shapes (Triton on the interpreter),
timed on the wall clock with one round; the predictions are for the real shapes.
"""
from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import os
import sys
import time
from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import nn

from tools import model, timing
from tools.layers import Holder

DROPOUT_P = 0.1
BF16 = torch.bfloat16


@dataclass(frozen=True)
class Point:
    """One (shape, rank) of the matrix: M tokens, K in-features, N out-features, rank r."""
    label: str
    m: int
    k: int
    n: int
    r: int

    def dims(self, dry: bool) -> tuple:
        """(M, K, N, r) to run: the CPU stand-in on a dry run (4-bit blocks of 64 fit K)."""
        if not dry:
            return self.m, self.k, self.n, self.r
        return 32, 64, 64 if self.n == self.k else 96, min(self.r, 32)


POINTS = (Point("4096² r=16", 8192, 4096, 4096, 16),
          Point("4096→11008 r=16", 8192, 4096, 11008, 16),
          Point("4096² r=64", 8192, 4096, 4096, 64),
          Point("4096→11008 r=64", 8192, 4096, 11008, 64))

# matrix method -> (LowRankLinear method, DoRA, 4-bit NF4 base)
METHODS = {"lora": ("lora", False, False), "lora_fa": ("lora_fa", False, False),
           "lora_xs": ("lora_xs", False, False), "dora": ("lora", True, False),
           "dora_fa": ("lora_fa", True, False), "qlora": ("lora", False, True),
           "qlora_fa": ("lora_fa", False, True)}
PLAIN = ("lora", "lora_fa", "lora_xs")
# PEFT has no LoRA-XS: its LoRA of the same rank is what LoRA-XS is compared with
PEFT_STAND_IN = {"lora_xs": "lora"}
XS_NOTE = "PEFT has no LoRA-XS: compared with PEFT LoRA of the same rank"


def have(package: str) -> bool:
    """Whether ``package`` can be imported here (nothing is imported to find out)."""
    try:
        return importlib.util.find_spec(package) is not None
    except (ImportError, ValueError):
        return False


def missing_reason(method: str, role: str) -> Optional[str]:
    """Why a contender cannot be built here (a package not installed), or None."""
    if METHODS.get(method, ("", False, False))[2] and not have("bitsandbytes"):
        return "bitsandbytes is not installed"
    if role == "peft" and not have("peft"):
        return "peft is not installed"
    return None


class FatalCudaError(RuntimeError):
    """A CUDA error: the context is broken for the rest of the process; the step must end."""


class Probe:
    """Runs groups and records rows: ``sink`` gets each row as it is made (tools.first writes
    it out at once); ``figures`` keeps them. On a CPU (a dry run) one timing round each."""

    def __init__(self, device: torch.device, hw: model.Hardware, code: model.Code, sink=None):
        self.device, self.hw, self.code = device, hw, code
        self.dry = device.type != "cuda"
        self.figures = []
        self.sink = sink
        self.errors = 0  # contenders that raised (not those missing a package)

    def record(self, row: dict) -> None:
        self.figures.append(row)
        if self.sink is not None:
            self.sink(row)
        else:
            print(json.dumps(row, default=str, ensure_ascii=False)[:200], flush=True)

    def time(self, contenders: dict) -> dict:
        """{name: Spread} through tools.timing (one round, the first call as warm-up, on a dry
        run)."""
        if self.dry:
            return timing.interleaved(contenders, self.device, rounds=1, cpu_warmup_rounds=0)
        return timing.interleaved(contenders, self.device)

    def first_call(self, fn) -> float:
        return timing.first_call_ms(fn, self.device)

    def attempt(self, what: dict, fn):
        """fn() in its own try: (True, result), or (False, None) after a row saying why
        (``failed``)."""
        try:
            return True, fn()
        except Exception as exc:  # noqa: BLE001  (one contender must not cost the others)
            self.failed(what, exc)
            return False, None

    def failed(self, what: dict, exc: BaseException) -> None:
        """Records why ``what`` failed. A CUDA error raises FatalCudaError after its row:
        nothing after it in this process would count."""
        error = _describe(exc)
        if self.cuda_broken(exc):
            self.record({**what, "kind": "fatal", "error": error, "cuda_error": True,
                         "ends_step": True})
            raise FatalCudaError(f"{what}: {error}") from exc
        self.errors += 1
        self.record({**what, "kind": "missing", "error": error})
        if self.device.type == "cuda":
            torch.cuda.empty_cache()  # an out-of-memory error leaves the rest runnable

    def cuda_broken(self, exc: BaseException) -> bool:
        return cuda_error(exc, self.device)


def cuda_error(exc: BaseException, device: torch.device) -> bool:
    """Whether exc (or its cause) is a CUDA error, or left the context broken: a launch
    failure, an illegal address, a device-side assert. Never on a CPU; an out-of-memory error
    is not one (the process goes on)."""
    if device.type != "cuda" or isinstance(exc, torch.cuda.OutOfMemoryError):
        return False
    text = _describe(exc) + (_describe(exc.__cause__) if exc.__cause__ else "")
    if any(s in text for s in ("CUDA error", "illegal memory access", "device-side assert",
                               "unspecified launch failure", "AcceleratorError")):
        return True
    try:
        torch.cuda.synchronize()
    except Exception:  # noqa: BLE001
        return True
    return False


def _describe(exc: BaseException) -> str:
    cause = exc.__cause__ if isinstance(exc, timing.ContenderError) and exc.__cause__ else exc
    return f"{type(cause).__name__}: {cause}"[:400]


def _ms(seconds) -> Optional[float]:
    return None if seconds is None else round(seconds * 1e3, 4)


# ------------------------------------------------------------------------------- the layers


def base_linear(k: int, n: int, device, seed: int = 0) -> nn.Linear:
    """The frozen bf16 nn.Linear (with bias) of a group, drawn on the device."""
    torch.manual_seed(seed)
    base = nn.Linear(k, n, device=device, dtype=BF16)
    return base.requires_grad_(False)


def linear_4bit(base: nn.Linear) -> nn.Module:
    """A frozen bitsandbytes Linear4bit holding ``base``'s W in NF4 with nested absmax
    (BitsAndBytesConfig's double quantization), blocksize 64, computing in bf16."""
    import bitsandbytes as bnb
    layer = bnb.nn.Linear4bit(base.in_features, base.out_features, bias=True, compute_dtype=BF16,
                              compress_statistics=True, quant_type="nf4", device="meta")
    layer.weight = bnb.nn.Params4bit(base.weight.detach().cpu(), requires_grad=False,
                                     blocksize=64, compress_statistics=True, quant_type="nf4")
    layer.bias = nn.Parameter(base.bias.detach().cpu(), requires_grad=False)
    return layer.to(base.weight.device)  # .to() quantizes


def _frozen_base(base: nn.Linear, four_bit: bool) -> nn.Module:
    return linear_4bit(base) if four_bit else copy.deepcopy(base)


def ours(base: nn.Linear, method: str, r: int, dropout: bool, backend: str) -> nn.Module:
    """LowRankLinear over a copy of ``base`` (a Linear4bit for QLoRA), B random, DoRA's m off
    ‖W‖ (so c ≠ 1). LoRA-XS takes random frozen factors (xs_source="random"): the time does not
    depend on them, and an exact SVD of W on the GPU would cost seconds per layer."""
    from lowrank_fused import LowRankLinear
    low_rank, dora, four_bit = METHODS[method]
    layer = LowRankLinear.from_linear(_frozen_base(base, four_bit), r, low_rank, backend=backend,
                                      dora=dora, dropout=DROPOUT_P if dropout else 0.0,
                                      xs_source="random")
    with torch.no_grad():
        layer.lora_b.normal_(0, 0.01)
        if dora:
            layer.magnitude.mul_(1.1)
    return layer.train()


def peft(base: nn.Linear, method: str, r: int, dropout: bool) -> nn.Module:
    """PEFT's layer doing ``method`` over a copy of ``base``: LoRA (A frozen for the -FA
    methods), use_dora for DoRA, its bitsandbytes layer over a Linear4bit for QLoRA; B random."""
    from peft import LoraConfig, get_peft_model
    _, dora, four_bit = METHODS[method]
    holder = Holder(_frozen_base(base, four_bit))
    layer = get_peft_model(holder, LoraConfig(r=r, lora_alpha=r, target_modules=["proj"],
                                              use_dora=dora,
                                              lora_dropout=DROPOUT_P if dropout else 0.0))
    with torch.no_grad():
        for name, param in layer.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.01)
            if "lora_A" in name and method.endswith("_fa"):
                param.requires_grad_(False)
    return layer.train()


# ------------------------------------------------------------------------- predictions


def predicted_s(role: str, method: Optional[str], point_dims, dropout: bool, probe: Probe,
                backward: bool, backend: str = "triton") -> Optional[float]:
    """tools.model's seconds for a contender at the real shape (None where it has no model)."""
    m, k, n, r = point_dims
    low_rank, dora, four_bit = METHODS.get(method, (None, False, False))
    if role == "bare":
        if method == "4bit":
            return None  # bitsandbytes' own kernels are not modelled
        return model.predict("bare", model.Case("lora", m, k, n, r, dropout), probe.code,
                             probe.hw, backward)
    case = model.Case(low_rank, m, k, n, r, dropout, quant="nf4" if four_bit and role == "ours"
                      else "")
    if dora:
        return model.predict_dora("fused" if role == "ours" else "peft", case, probe.code,
                                  probe.hw, backward)
    if role == "peft":
        if four_bit:
            return None  # PEFT's bitsandbytes layer is not modelled
        case = model.Case(PEFT_STAND_IN.get(method, low_rank), m, k, n, r, dropout)
        return model.predict("peft", case, probe.code, probe.hw, backward)
    return model.predict(backend, case, probe.code, probe.hw, backward)


# ---------------------------------------------------------------------------- the matrix


@dataclass
class Contender:
    name: str
    role: str  # "ours", "bare" or "peft"
    method: Optional[str]  # matrix method; "4bit" for the bare Linear4bit; None: dense bare
    backend: Optional[str]
    build: Callable[[], nn.Module]
    note: str = ""


def matrix_contenders(base, point_dims, dropout, methods, backends, peft_methods) -> list:
    """Ours first (every backend, every method), then the bare layers, then PEFT's."""
    _, _, _, r = point_dims
    out = []
    for method in methods:
        for backend in backends:
            if backend != "triton" and method not in PLAIN:
                continue  # DoRA and 4-bit calls run on Triton whatever backend is asked
            out.append(Contender(f"ours-{backend} {method}", "ours", method, backend,
                                 lambda m=method, b=backend: ours(base, m, r, dropout, b)))
    out.append(Contender("bare", "bare", None, None, lambda: base))
    if any(METHODS[m][2] for m in methods):
        out.append(Contender("bare-4bit", "bare", "4bit", None, lambda: linear_4bit(base)))
    for method in dict.fromkeys(PEFT_STAND_IN.get(m, m) for m in peft_methods):
        out.append(Contender(f"peft {method}", "peft", method, None,
                             lambda m=method: peft(base, m, r, dropout)))
    return out


def _layer_inputs(probe: Probe, point: Point):
    """(x, G, the frozen bf16 base) of a point, drawn on the device; x requires grad."""
    m, k, n, _ = point.dims(probe.dry)
    gen = torch.Generator(device=probe.device).manual_seed(1)
    x = torch.randn(m, k, device=probe.device, dtype=BF16, generator=gen).requires_grad_(True)
    g = torch.randn(m, n, device=probe.device, dtype=BF16, generator=gen)
    return x, g, base_linear(k, n, probe.device)


def _runners(layer, x, g, device):
    def fwd():
        with torch.autocast(device.type, dtype=BF16):
            return layer(x)

    def fwd_bwd():
        fwd().backward(g)

    before = timing.grads_to_none(x, layer)
    return {"fwd": timing.Timed(fwd, before), "fwd+bwd": timing.Timed(fwd_bwd, before)}


def matrix_group(probe: Probe, group: str, point: Point, *, dropout: bool = False,
                 methods=tuple(METHODS), backends=("triton",), with_peft: bool = True) -> None:
    """One point of the matrix: every contender built and its cold fwd+bwd run (ours first, each
    in its own try), the bare layer timed alone, then all of them interleaved (fwd, then
    fwd+bwd), the bare layer alone again (noise); a row per timing, a row per ratio."""
    dims, real = point.dims(probe.dry), (point.m, point.k, point.n, point.r)
    dev = probe.device
    where = dict(group=group, point=point.label, m=point.m, k=point.k, n=point.n, r=point.r,
                 dropout=dropout, **({"cpu_dims": list(dims)} if probe.dry else {}))
    x, g, base = _layer_inputs(probe, point)
    peft_methods = [mt for mt in methods if with_peft]
    runners, first_ms = {}, {}
    for c in matrix_contenders(base, dims, dropout, methods, backends, peft_methods):
        what = dict(where, contender=c.name, role=c.role, method=c.method)
        reason = missing_reason("qlora" if c.method == "4bit" else c.method, c.role)
        if reason:
            probe.record({**what, "kind": "missing", "skipped": reason})
            continue
        ok, layer = probe.attempt(what, c.build)
        if not ok:
            continue
        run = _runners(layer, x, g, dev)
        ok, ms = probe.attempt(what, lambda: probe.first_call(
            lambda: (run["fwd+bwd"].before(), run["fwd+bwd"].fn())))
        if ok:
            runners[c.name], first_ms[c.name] = (c, run), ms
    if "bare" not in runners:
        return
    bare = runners["bare"][1]
    start = {mode: probe.time({"bare": bare[mode]})["bare"] for mode in bare}
    spreads = {}
    for mode in ("fwd", "fwd+bwd"):
        timed = {name: run[mode] for name, (_, run) in runners.items()}
        while timed:
            try:
                spreads[mode] = probe.time(timed)
                break
            except timing.ContenderError as exc:  # drop it, time the rest again
                probe.failed(dict(where, contender=exc.contender, mode=mode), exc)
                timed.pop(exc.contender)
    end = {mode: probe.time({"bare": bare[mode]})["bare"] for mode in bare}
    for mode in ("fwd", "fwd+bwd"):
        probe.record({**where, "kind": "noise", "mode": mode,
                      "bare_start_ms": round(start[mode].p50, 4),
                      "bare_end_ms": round(end[mode].p50, 4),
                      "drift": round(end[mode].p50 / start[mode].p50 - 1, 4)})
        got = spreads.get(mode, {})
        for name, spread in got.items():
            c = runners[name][0]
            predicted = predicted_s(c.role, c.method, real, dropout, probe, mode != "fwd",
                                    c.backend or "triton")
            probe.record({**where, "kind": "time", "contender": name, "role": c.role,
                          "method": c.method, "backend": c.backend, "mode": mode,
                          **spread.row(), "predicted_ms": _ms(predicted),
                          # the contender's cold first call, of fwd+bwd (its fwd ran in it)
                          "first_call_ms": round(first_ms[name], 1), "note": c.note or None})
        _ratios(probe, where, mode, got, runners, real, dropout)


def _ratios(probe, where, mode, got, runners, real, dropout) -> None:
    """Each of ours (and PEFT's) against the bare layer(s), each of ours against PEFT's same
    method (LoRA-XS: PEFT LoRA) and, on CUDA C++, against ours on Triton."""
    def ratio(name, against, note=None):
        if name not in got or against not in got:
            return
        mine, theirs = runners[name][0], runners[against][0]
        bwd = mode != "fwd"
        p_mine = predicted_s(mine.role, mine.method, real, dropout, probe, bwd,
                             mine.backend or "triton")
        p_theirs = predicted_s(theirs.role, theirs.method, real, dropout, probe, bwd,
                               theirs.backend or "triton")
        probe.record({**where, "kind": "ratio", "mode": mode, "contender": name,
                      "method": mine.method, "against": against,
                      "measured": round(got[name].p50 / got[against].p50, 4),
                      "spread": [round(got[name].p20 / got[against].p50, 4),
                                 round(got[name].p80 / got[against].p50, 4)],
                      "predicted": None if p_mine is None or p_theirs is None
                      else round(p_mine / p_theirs, 4), "note": note})

    for name, (c, _) in runners.items():
        if c.role == "bare":
            continue
        ratio(name, "bare")
        if c.method in METHODS and METHODS[c.method][2]:
            ratio(name, "bare-4bit")
        if c.role == "ours":
            peft_method = PEFT_STAND_IN.get(c.method, c.method)
            ratio(name, f"peft {peft_method}", XS_NOTE if c.method in PEFT_STAND_IN else None)
            if c.backend != "triton":
                ratio(name, f"ours-triton {c.method}")


# ------------------------------------------------------------------------ other groups


def calibration_group(probe: Probe, group: str) -> None:
    """4096², r = 16, LoRA-FA: the layer under full autotuning with the tiled and with the TMA
    GEMMs forced, against itself under quick (tiled), all interleaved: tuned ÷ quick."""
    point = POINTS[0]
    r, real, dev = point.dims(probe.dry)[3], (point.m, point.k, point.n, point.r), probe.device
    x, g, base = _layer_inputs(probe, point)
    where = dict(group=group, point=point.label, m=point.m, k=point.k, n=point.n, r=point.r,
                 method="lora_fa", dropout=False)
    settings = {"quick": ("quick", "tiled"), "full tiled": ("full", "tiled"),
                "full tma": ("full", "tma")}
    runs, first = {}, {}
    for label, (mode, variant) in settings.items():
        layer = ours(base, "lora_fa", r, False, "triton")
        run = _runners(layer, x, g, dev)
        env = _env_setter(mode, variant)
        for which in run.values():
            which.before = _chain(env, which.before)
        what = dict(where, contender=f"ours-triton lora_fa {label}")
        ok, ms = probe.attempt(what, lambda run=run: probe.first_call(
            lambda: (run["fwd+bwd"].before(), run["fwd+bwd"].fn())))
        if ok:
            runs[label], first[label] = run, ms
    quick_env = _env_setter("quick", None)
    quick_env()  # what the matrix runs under
    for mode in ("fwd", "fwd+bwd"):
        got = probe.time({label: run[mode] for label, run in runs.items()})
        quick_env()
        for label, spread in got.items():
            probe.record({**where, "kind": "time", "contender": f"ours-triton lora_fa {label}",
                          "role": "ours", "backend": "triton", "mode": mode,
                          "autotune": settings[label][0], "gemm": settings[label][1],
                          **spread.row(), "first_call_ms": round(first[label], 1),
                          "predicted_ms": _ms(predicted_s("ours", "lora_fa", real, False, probe,
                                                          mode != "fwd"))})
            if label != "quick" and "quick" in got:
                probe.record({**where, "kind": "calibration", "mode": mode,
                              "contender": f"ours-triton lora_fa {label}",
                              "tuned_over_quick": round(spread.p50 / got["quick"].p50, 4)})


def _env_setter(mode: str, variant: Optional[str]):
    def apply():
        os.environ["LOWRANK_FUSED_AUTOTUNE"] = mode
        if variant is None:
            os.environ.pop("LOWRANK_FUSED_TRITON_GEMM", None)
        else:
            os.environ["LOWRANK_FUSED_TRITON_GEMM"] = variant
    return apply


def _chain(*fns):
    def run():
        for fn in fns:
            if fn is not None:
                fn()
    return run


def gemm_group(probe: Probe, group: str) -> None:
    """Triton's main GEMMs (rank term at r = 1, s = 0), tiled and TMA, against cuBLAS, at 4096²
    and 4096→11008, M = 8192, bf16; and a device-to-device copy: the measured bandwidth
    ceiling."""
    from lowrank_fused import triton_kernels as tk
    dev = probe.device
    for point in POINTS[:2]:
        m, k, n, _ = point.dims(probe.dry)
        gen = torch.Generator(device=dev).manual_seed(2)
        x = torch.randn(m, k, device=dev, dtype=BF16, generator=gen)
        w = torch.randn(n, k, device=dev, dtype=BF16, generator=gen)
        gy = torch.randn(m, n, device=dev, dtype=BF16, generator=gen)
        p1 = torch.randn(m, 1, device=dev, dtype=BF16, generator=gen)
        b1 = torch.randn(n, 1, device=dev, dtype=BF16, generator=gen)
        dp1 = torch.randn(m, 1, device=dev, dtype=torch.float32, generator=gen)
        a1 = torch.randn(1, k, device=dev, dtype=BF16, generator=gen)
        flops = 2 * point.m * point.n * point.k
        cublas = flops / (probe.hw.gemm_tflops * 1e12) + probe.hw.launch_us * 1e-6
        triton_s = (flops / (probe.hw.gemm_tflops * 1e12 * probe.hw.triton_gemm_efficiency)
                    + probe.hw.launch_us * 1e-6)
        calls = {"cuBLAS F.linear": (lambda: torch.nn.functional.linear(x, w), cublas),
                 "cuBLAS G@W": (lambda: gy @ w, cublas)}
        for v in ("tiled", "tma"):
            calls[f"Triton fused_linear {v} (r=1, s=0)"] = (
                lambda v=v: tk.fused_linear(x, w, None, p1, b1, 0.0, variant=v), triton_s)
            calls[f"Triton grad_input {v} (r=1)"] = (
                lambda v=v: tk.grad_input(gy, w, dp1, a1, variant=v), triton_s)
        _time_calls(probe, dict(group=group, point=point.label[:point.label.index(" ")],
                                m=point.m, k=point.k, n=point.n), calls, flops=flops)
    nbytes = (1 << 30) if not probe.dry else (1 << 20)
    src = torch.empty(nbytes // 2, device=dev, dtype=BF16).normal_()
    dst = torch.empty_like(src)
    got = probe.time({"copy": lambda: dst.copy_(src)})["copy"]
    probe.record({"group": group, "kind": "figure", "name": f"device-to-device copy "
                  f"{nbytes >> 20} MiB", **got.row(),
                  "tb_s_read_plus_write": round(2 * nbytes / (got.p50 * 1e-3) / 1e12, 3),
                  "assumed_hbm_tb_s": probe.hw.hbm_tb_s})


def _time_calls(probe: Probe, where: dict, calls: dict, flops: Optional[float] = None) -> None:
    """Times {label: (fn, predicted seconds)} interleaved, each first run in its own try."""
    kept, first = {}, {}
    for label, (fn, _) in calls.items():
        ok, ms = probe.attempt(dict(where, contender=label), lambda fn=fn: probe.first_call(fn))
        if ok:
            kept[label], first[label] = fn, ms
    got = probe.time(kept) if kept else {}
    for label, spread in got.items():
        row = {**where, "kind": "figure", "name": label, **spread.row(),
               "predicted_ms": _ms(calls[label][1]), "first_call_ms": round(first[label], 1)}
        if flops and not probe.dry:
            row["tflops"] = round(flops / (spread.p50 * 1e-3) / 1e12, 1)
        probe.record(row)


def kernels_group(probe: Probe, group: str) -> None:
    """Each Triton kernel of LoRA's sequence at 4096², r = 16 (bf16 base, fp32 adapters),
    dropout off and on, beside tools.model's breakdown of the same sequence."""
    from lowrank_fused import triton_kernels as tk
    point = POINTS[0]
    m, k, n, r = point.dims(probe.dry)
    dev = probe.device
    gen = torch.Generator(device=dev).manual_seed(3)
    x = torch.randn(m, k, device=dev, dtype=BF16, generator=gen)
    w = torch.randn(n, k, device=dev, dtype=BF16, generator=gen)
    gy = torch.randn(m, n, device=dev, dtype=BF16, generator=gen)
    a = torch.randn(r, k, device=dev, generator=gen) / k ** 0.5
    b = torch.randn(n, r, device=dev, generator=gen) * 0.01
    for dropout in (False, True):
        p_drop = DROPOUT_P if dropout else 0.0
        p = tk.project(x, a, 7, p_drop)
        dp, _, _ = tk.grad_output_pass(gy, b, p, 2.0, need_dp=True, need_db=True,
                                       need_dbias=False)
        case = model.Case("lora", point.m, point.k, point.n, point.r, dropout)
        predicted = dict(model.breakdown("triton", case, probe.code, probe.hw, True))
        calls = {"project": lambda p_drop=p_drop: tk.project(x, a, 7, p_drop),
                 "fused_linear": lambda p=p: tk.fused_linear(x, w, None, p, b, 2.0),
                 "grad_output_pass": lambda p=p: tk.grad_output_pass(
                     gy, b, p, 2.0, need_dp=True, need_db=True, need_dbias=False),
                 "grad_input": lambda dp=dp, p_drop=p_drop: tk.grad_input(gy, w, dp, a, 7, p_drop),
                 "grad_a": lambda dp=dp, p_drop=p_drop: tk.grad_a(dp, x, a.dtype, 7, p_drop)}
        _time_calls(probe, dict(group=group, point=point.label, method="lora", dropout=dropout),
                    {f"kernel {name} dropout={'on' if dropout else 'off'}":
                     (fn, predicted.get(name)) for name, fn in calls.items()})


FIRST_STEP_GROUP = "llama-7b widths 2 layers first step"
LLAMA_7B_WIDTHS = dict(layers=2, d=4096, ff=11008, batch=4, seq=2048, head_dim=128, vocab=32000)
LLAMA_DRY = dict(layers=1, d=64, ff=176, batch=2, seq=16, head_dim=32, vocab=128)
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class _Stack(nn.Module):
    """Without transformers: LowRankLinear-ready Linear layers of a LLaMA block's widths
    (q, k, v, o: d→d; gate, up: d→ff; down: ff→d), per layer x + o(q+k+v), then + down(silu(
    gate)·up), a mean-square loss."""

    def __init__(self, layers, d, ff, device):
        super().__init__()
        def lin(i, o):
            return nn.Linear(i, o, bias=False, device=device, dtype=BF16)
        self.blocks = nn.ModuleList(nn.ModuleDict(
            dict(q_proj=lin(d, d), k_proj=lin(d, d), v_proj=lin(d, d), o_proj=lin(d, d),
                 gate_proj=lin(d, ff), up_proj=lin(d, ff), down_proj=lin(ff, d)))
            for _ in range(layers))

    def forward(self, h):
        for b in self.blocks:
            h = h + b["o_proj"](b["q_proj"](h) + b["k_proj"](h) + b["v_proj"](h))
            h = h + b["down_proj"](torch.nn.functional.silu(b["gate_proj"](h)) * b["up_proj"](h))
        return h.float().pow(2).mean()


def llama_first_step_group(probe: Probe, group: str) -> None:
    """The cold and the warm first training step (forward, backward, AdamW) of a 2-layer model
    of LLaMA-7B's widths, LoRA r = 16 on all seven projections (apply_low_rank, backend
    "auto"), bf16, M = 8192 tokens, under full autotuning: from transformers' LlamaConfig where
    transformers is importable, else a stack of the same Linear widths.

    Cold: a fresh tuning cache (a temporary directory) and no kernel choice in memory, so each
    key's backend is timed and each kernel autotuned. Warm: a new tuner over that cache and
    again no kernel choice in memory, which is what a second process at the same keys sees
    (its kernels, already compiled here, it would load from Triton's disk cache): it must time
    nothing. Each step's row counts what it timed; then lowrank_fused.tuning_report() and how
    many keys each backend won. The decisions are merged into this machine's tuning cache
    (what ``tools/gpu_session.sh policy`` ships)."""
    import tempfile
    import lowrank_fused
    from lowrank_fused import apply_low_rank, tuning
    s = LLAMA_DRY if probe.dry else LLAMA_7B_WIDTHS
    net, loss_of, built = _llama_model(s, probe.device)
    summary = apply_low_rank(net, list(TARGETS), 16, "lora", backend="auto")
    for module in net.modules():
        if hasattr(module, "lora_b") and module.lora_b is not None:
            with torch.no_grad():
                module.lora_b.normal_(0, 0.01)
    optimizer = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=1e-4)

    def step():
        with torch.autocast(probe.device.type, dtype=BF16):
            loss = loss_of()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    where = dict(group=group, model=built, layers=s["layers"], d=s["d"], ff=s["ff"],
                 tokens=s["batch"] * s["seq"], rank=16, method="lora", backend="auto",
                 autotune="full", trainable=summary.trainable_parameters,
                 adapted=len(summary.replaced))
    mode = os.environ.get("LOWRANK_FUSED_AUTOTUNE")
    os.environ["LOWRANK_FUSED_AUTOTUNE"] = "full"
    try:
        with tempfile.TemporaryDirectory(prefix="lowrank_fused-first-step-") as cache:
            for which in ("cold", "warm"):
                tuning.configure(cache_dir=cache)  # a new process's tuner
                _forget_kernel_choices()
                with _timing_counts() as timed:
                    ms = probe.first_call(step)
                report = lowrank_fused.tuning_report()
                timed["backend keys"] = sum(r["source"] == "timed now" for r in report)
                probe.record({**where, "kind": "figure", "name": f"first training step, {which}",
                              "ms": round(ms, 1), "timed": timed,
                              "sources": _count(r["source"] for r in report)})
            steady = probe.time({"step": step})["step"]
            probe.record({**where, "kind": "figure", "name": "training step, steady",
                          "steady": steady.row()})
            _keep_decisions(cache)
    finally:
        _restore_env("LOWRANK_FUSED_AUTOTUNE", mode)
        tuning.configure()
    probe.record({"group": group, "kind": "figure", "name": "tuning_report", "report": report,
                  "winners": _count(r["winner"] for r in report)})


def _llama_model(s: dict, dev: torch.device) -> tuple:
    """(model, loss function, what it is) of the LLaMA widths ``s``."""
    torch.manual_seed(0)
    if have("transformers"):
        from tools import model_level as ml
        shape = ml.Shape(s["layers"], s["d"], s["ff"], s["batch"], s["seq"],
                         head_dim=s["head_dim"], vocab=s["vocab"])
        with torch.device(dev):  # initialised on the device: seconds fewer than on the CPU
            net = ml.ARCHS["llama"].build(shape)
        net = net.to(dtype=BF16)
        ids = torch.randint(0, s["vocab"], (s["batch"], s["seq"]), device=dev)
        return net, lambda: net(input_ids=ids, labels=ids).loss, "transformers LlamaForCausalLM"
    net = _Stack(s["layers"], s["d"], s["ff"], dev)
    h = torch.randn(s["batch"] * s["seq"], s["d"], device=dev, dtype=BF16)
    return net, lambda: net(h), "LowRankLinear stack of LLaMA's widths (transformers not importable)"


def _count(values) -> dict:
    counts = {}
    for value in values:
        counts[value] = counts.get(value, 0) + 1
    return counts


def _restore_env(name: str, value: Optional[str]) -> None:
    if value is None:
        os.environ.pop(name, None)
    else:
        os.environ[name] = value


def _forget_kernel_choices() -> None:
    """Drop the launch configs and GEMM variants chosen in this process (the compiled kernels
    stay): the next launches choose as a new process would, from the tuning cache or by
    timing."""
    if not have("triton"):
        return
    from lowrank_fused.triton_kernels import autotuner, variants
    for tuned in autotuner._tuned.values():
        tuned.cache.clear()
    variants._winners.clear()


class _timing_counts:
    """Counts what runs timed inside the block: "configs benchmarked" (the kernels'
    autotuners), "variant timings" (tiled against TMA); the caller adds the backend keys."""

    def __enter__(self) -> dict:
        self.counts = {"configs benchmarked": 0, "variant timings": 0}
        self.patched = []
        if have("triton"):
            from lowrank_fused.triton_kernels import autotuner, variants
            self._count(autotuner._Autotuner, "_bench", "configs benchmarked")
            self._count(variants, "_variant_times", "variant timings")
        return self.counts

    def _count(self, owner, name: str, label: str) -> None:
        original = owner.__dict__[name]

        def counted(*args, **kwargs):
            self.counts[label] += 1
            return original(*args, **kwargs)
        setattr(owner, name, counted)
        self.patched.append((owner, name, original))

    def __exit__(self, *exc) -> None:
        for owner, name, original in self.patched:
            setattr(owner, name, original)


def _keep_decisions(directory: str) -> None:
    """Merge the tuning cache files of ``directory`` into this machine's (where "auto" keeps
    its decisions), as a user's run would have left them."""
    from pathlib import Path
    from lowrank_fused.tuning import cache_dir
    from lowrank_fused.tuning.environment import Environment
    from lowrank_fused.tuning.schema import SchemaError, check_cache
    from lowrank_fused.tuning.store import Store, read_json
    for path in Path(directory).glob("tuning-*.json"):
        data, _ = read_json(path)
        try:
            environment = Environment(**data["environment"])
            winners, kernels, _ = check_cache(data, environment.as_dict(), str(path))
        except (SchemaError, TypeError, KeyError):
            continue
        Store(cache_dir(), environment).put(winners=winners, kernels=kernels)


def bert_model_group(probe: Probe, group: str) -> None:
    """The model benchmark's BERT case (tools/model_level.py): RoBERTa-large width, LoRA-FA,
    bf16 base, lora_dropout 0.05, PEFT against enable_fused."""
    if not have("peft") or not have("transformers"):
        probe.record({"group": group, "kind": "missing", "skipped":
                      "peft and transformers are needed (the case compares PEFT models)"})
        return
    from tools import model_level as ml
    shape = ml.PRESETS["tiny" if probe.dry else "compass"].shapes["bert"]
    case = ml.Case("bert", "lora_fa", "bfloat16", 0.05, shape)
    figures = ml.run_case(case, probe.device, warmup=0 if probe.dry else 1,
                          repeats=1 if probe.dry else 5)
    probe.record({"group": group, "kind": "figure", "name": f"model {case.id}", **figures})


# ---------------------------------------------------------------------------------- plan


@dataclass
class Group:
    name: str
    est_s: float  # H100, quick autotuning, the correctness step's kernels already compiled
    run: Callable[[], None]


# A dry run's points after the first: one method of each family (plain, DoRA, 4-bit); the
# first point and the dropout point run them all (on the interpreter a point's code is the
# same at any shape, and CI's dry run must stay short)
DRY_LATER_METHODS = ("lora", "dora", "qlora")


def plan(probe: Probe, cuda_backend: bool = False) -> list:
    """The speed step's groups in order, with their estimated seconds (what they were counted
    from is beside each). ``cuda_backend``: the matrix times ours on CUDA C++ too."""
    backends = ("triton", "cuda") if cuda_backend else ("triton",)
    groups = []
    # a matrix point: ~16 layers built (LoRA-XS's SVD, 4-bit quantization), their cold
    # fwd+bwd, ~34 timings of ~100 ms; r = 64 first compiles its dropout-off kernels
    # (~15 quick builds at ~1 s), which 4096→11008 then reuses (the config does not depend on N)
    for i, (point, est) in enumerate(zip(POINTS, (20, 20, 35, 25))):
        name = f"matrix {point.label}"
        methods = DRY_LATER_METHODS if probe.dry and i else tuple(METHODS)
        groups.append(Group(name, est, lambda p=point, nm=name, mt=methods: matrix_group(
            probe, nm, p, methods=mt, backends=backends)))
    # full autotuning of LoRA-FA's kernels, both GEMM variants: ~37 configs at ~1 s a build
    groups.append(Group("calibration full/quick 4096² r=16 lora_fa", 55,
                        lambda: calibration_group(probe, "calibration full/quick 4096² r=16 "
                                                         "lora_fa")))
    name = f"matrix {POINTS[0].label} dropout=on"
    groups.append(Group(name, 20, lambda: matrix_group(probe, name, POINTS[0], dropout=True,
                                                       backends=backends)))
    groups.append(Group("gemm vs cuBLAS, copy ceiling", 10,
                        lambda: gemm_group(probe, "gemm vs cuBLAS, copy ceiling")))
    groups.append(Group("kernels 4096² r=16 lora", 8,
                        lambda: kernels_group(probe, "kernels 4096² r=16 lora")))
    groups.append(Group("model bert lora_fa bf16 dropout=0.05", 15,
                        lambda: bert_model_group(probe, "model bert lora_fa bf16 "
                                                        "dropout=0.05")))
    # Last, past the first call's budget: full autotuning of a fresh cache, ~120 builds (the
    # seven projections' three shapes, forward and backward), several at once, then the same
    # step again; a guess until measured. A later call runs it: --resume --groups llama.
    groups.append(Group(FIRST_STEP_GROUP, 45,
                        lambda: llama_first_step_group(probe, FIRST_STEP_GROUP)))
    return groups


def cuda_plan(probe: Probe) -> list:
    """tools.first's cuda step, once the extension is built: the plain methods on CUDA C++
    beside Triton and the bare layer at each matrix point (no PEFT: its ratios are the speed
    step's)."""
    return [Group(f"matrix cuda {p.label}", est, lambda p=p: matrix_group(
        probe, f"matrix cuda {p.label}", p, methods=PLAIN, backends=("triton", "cuda"),
        with_peft=False)) for p, est in zip(POINTS, (6, 6, 10, 8))]


def selected(groups: list, prefixes) -> list:
    """The groups whose name starts with one of ``prefixes`` (None: all)."""
    if not prefixes:
        return groups
    return [g for g in groups if any(g.name.startswith(p) for p in prefixes)]


def run(out: str, quick: bool = False, budget_s: float = 230.0, prefixes=None) -> dict:
    """The plan in order, rewriting ``out`` after every group so a cut-off run keeps its
    figures; a group whose estimate no longer fits the budget is listed as skipped."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type != "cuda":
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before the kernels are imported
    from lowrank_fused import available_backends
    hw, code = model.Hardware(), model.Code()
    probe = Probe(device, hw, code)
    groups = plan(probe, device.type == "cuda" and "cuda" in available_backends())
    groups = selected(groups[:1] if quick else groups, prefixes)
    start = time.time()
    result = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu (dry run)",
              "dry_run": probe.dry, "torch": torch.__version__,
              "hardware_assumed": vars(hw), "code_assumed": vars(code),
              "plan": [(g.name, g.est_s) for g in groups], "skipped": [],
              "figures": probe.figures}
    for group in groups:
        left = budget_s - (time.time() - start)
        if not probe.dry and group.est_s > left:
            result["skipped"].append(f"{group.name}: needs ~{group.est_s:.0f} s, {left:.0f} s left")
            continue
        try:
            group.run()
        except FatalCudaError:
            result.setdefault("errors", []).append(f"{group.name}: CUDA error (see its row)")
            break
        except Exception as exc:  # noqa: BLE001  (one broken group must not waste the run)
            result.setdefault("errors", []).append(f"{group.name}: {_describe(exc)}"[:300])
            if probe.dry:
                raise  # on CPU a failure is a bug to fix before any GPU run
        result["seconds"] = round(time.time() - start, 1)
        _write_json(out, result)
    _write_json(out, result)
    print(f"probe: {len(probe.figures)} rows in {result.get('seconds')} s, "
          f"{len(result['skipped'])} groups skipped (budget {budget_s:.0f} s) -> {out}")
    return result


def _write_json(path: str, data: dict) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(data, f, indent=0, ensure_ascii=False, default=str)
    os.replace(tmp, path)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, metavar="PATH", help="where to write the JSON")
    parser.add_argument("--quick", action="store_true", help="the first matrix point only")
    parser.add_argument("--budget-s", type=float, default=230.0,
                        help="start no group whose estimate exceeds what is left (default 230)")
    parser.add_argument("--groups", type=lambda v: v.split(","), default=None,
                        help="comma-separated name prefixes of the groups to run")
    args = parser.parse_args(argv)
    # the matrix compiles one config per kernel, as tools.first's speed step does
    os.environ.setdefault("LOWRANK_FUSED_AUTOTUNE", "quick")
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    run(args.out, args.quick, args.budget_s, args.groups)
    return 0


if __name__ == "__main__":
    sys.exit(main())
