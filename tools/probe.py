"""The figures that decide the design, measured next to what tools.model predicts.

    python -m tools.probe --out PATH.json [--quick]

On a CUDA GPU (< 3 minutes on an H100): the Triton main GEMMs (fused_linear with the rank term
at r = 1 and s = 0, grad_input likewise) against cuBLAS at 8192x4096x4096 and 8192x4096x11008
bf16; each Triton kernel of the LoRA-FA and LoRA sequences at r = 16 and 64, dropout on and off;
forward and forward+backward of the layers (bare frozen nn.Linear, PEFT's LoRA under bf16
autocast, ours on Triton and, when lowrank_fused._C is built, CUDA) with their ratios. Times are
CUDA-event medians after warm-up (autotuning included in the warm-up).

Without CUDA it is a dry run: the same code on tiny CPU shapes (Triton on the interpreter),
every callable run once, measured = null, predictions for the real shapes; exits 0 in seconds.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch

from tools import model

SHAPES = (("4096²", 8192, 4096, 4096), ("4096→11008", 8192, 4096, 11008))
RANKS = (16, 64)
DROPOUT_P = 0.1
DRY_SHAPE = (32, 64, 64)  # M, K, N on the CPU


def cuda_median_ms(fn, reps: int = 10, warmup: int = 3) -> float:
    """Median of ``reps`` CUDA-event timings of fn() after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


class Probe:
    """Collects figures: name, predicted ms (model), measured ms (None on a dry run), and the
    cold first call's wall time (compile and autotuning included). ``sink``: called with each
    row as it is made (tools.first writes it out at once)."""

    def __init__(self, device: torch.device, hw: model.Hardware, code: model.Code, sink=None):
        self.device, self.hw, self.code = device, hw, code
        self.dry = device.type != "cuda"
        self.figures = []
        self.sink = sink

    def record(self, row: dict) -> None:
        self.figures.append(row)
        if self.sink is not None:
            self.sink(row)

    def measure(self, fn):
        """(median ms, first call ms): (None, None) on a dry run, which runs fn once."""
        if self.dry:
            fn()  # the same path, once, untimed
            return None, None
        torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        first = (time.perf_counter() - start) * 1e3
        return cuda_median_ms(fn), first

    def add(self, name: str, predicted_s, fn, **extra):
        measured, first = self.measure(fn)
        row = {"name": name, "predicted_ms": None if predicted_s is None else
               round(predicted_s * 1e3, 4),
               "measured_ms": None if measured is None else round(measured, 4),
               "first_call_ms": None if first is None else round(first, 1), **extra}
        self.record(row)
        if self.sink is None:  # a sink prints its own lines
            shown = "n/a" if measured is None else f"{measured:.3f}"
            pred = "-" if predicted_s is None else f"{predicted_s * 1e3:.3f}"
            print(f"{name:60s} predicted {pred:>8s} ms   measured {shown:>8s} ms", flush=True)
        return measured


def _dims(probe, m, k, n):
    return DRY_SHAPE if probe.dry else (m, k, n)


def probe_gemms(probe: Probe, label, m, k, n):
    """Triton's main GEMMs (rank term at r = 1, s = 0) vs cuBLAS."""
    from lowrank_fused import triton_kernels as tk
    dm, dk, dn = _dims(probe, m, k, n)
    dev, bf16 = probe.device, torch.bfloat16
    x = torch.randn(dm, dk, device=dev, dtype=bf16)
    w = torch.randn(dn, dk, device=dev, dtype=bf16)
    g = torch.randn(dm, dn, device=dev, dtype=bf16)
    p1 = torch.zeros(dm, 1, device=dev, dtype=bf16)
    b1 = torch.zeros(dn, 1, device=dev, dtype=bf16)
    dp1 = torch.zeros(dm, 1, device=dev, dtype=torch.float32)
    a1 = torch.zeros(1, dk, device=dev, dtype=bf16)
    gemm = 2 * m * n * k / (probe.hw.gemm_tflops * 1e12) + probe.hw.launch_us * 1e-6
    triton_gemm = 2 * m * n * k / (probe.hw.gemm_tflops * 1e12 * probe.hw.triton_gemm_efficiency)
    triton_gemm += probe.hw.launch_us * 1e-6
    probe.add(f"{label} cuBLAS F.linear", gemm, lambda: torch.nn.functional.linear(x, w))
    variants = ("tiled", "tma") if tk_tma(probe.device) else ("tiled",)
    for v in variants:
        probe.add(f"{label} Triton fused_linear {v} (r=1, s=0)", triton_gemm,
                  lambda v=v: tk.fused_linear(x, w, None, p1, b1, 0.0, variant=v))
    probe.add(f"{label} cuBLAS G@W", gemm, lambda: g @ w)
    for v in variants:
        probe.add(f"{label} Triton grad_input {v} (r=1)", triton_gemm,
                  lambda v=v: tk.grad_input(g, w, dp1, a1, variant=v))


def tk_tma(device) -> bool:
    """Whether the persistent TMA GEMMs can run here (on the interpreter they are emulated)."""
    from lowrank_fused.triton_kernels import variants
    return variants.tma_supported(device)


def probe_kernels(probe: Probe, label, m, k, n, r, method, dropout):
    """Each Triton kernel of one LoRA / LoRA-FA sequence (bf16 base, fp32 adapters)."""
    from lowrank_fused import triton_kernels as tk
    dm, dk, dn = _dims(probe, m, k, n)
    dev = probe.device
    x = torch.randn(dm, dk, device=dev, dtype=torch.bfloat16)
    w = torch.randn(dn, dk, device=dev, dtype=torch.bfloat16)
    g = torch.randn(dm, dn, device=dev, dtype=torch.bfloat16)
    a = torch.randn(r, dk, device=dev) / dk ** 0.5
    b = torch.randn(dn, r, device=dev) * 0.01
    p_drop = DROPOUT_P if dropout else 0.0
    p = tk.project(x, a, 7, p_drop)
    dp, _, _ = tk.grad_output_pass(g, b, p, 2.0, need_dp=True, need_db=True, need_dbias=False)
    case = model.Case(method, m, k, n, r, dropout)
    predicted = dict(model.breakdown("triton", case, probe.code, probe.hw, True))
    tag = f"{label} r={r} {method} dropout={'on' if dropout else 'off'}"
    calls = {"project": lambda: tk.project(x, a, 7, p_drop),
             "fused_linear": lambda: tk.fused_linear(x, w, None, p, b, 2.0),
             "grad_output_pass": lambda: tk.grad_output_pass(
                 g, b, p, 2.0, need_dp=True, need_db=True, need_dbias=False),
             "grad_input": lambda: tk.grad_input(g, w, dp, a, 7, p_drop)}
    if method == "lora":
        calls["grad_a"] = lambda: tk.grad_a(dp, x, a.dtype, 7, p_drop)
    for name, fn in calls.items():
        probe.add(f"{tag} kernel {name}", predicted.get(name), fn)


def _layer(impl: str, k: int, n: int, r: int, method: str, dropout: bool, device,
           dora: bool = False):
    """A bare frozen bf16 Linear, PEFT's LoRA layer over it, or LowRankLinear on backend
    ``impl``; ``dora``: the DoRA layer (PEFT's use_dora, LowRankLinear(dora=True)) with B
    non-zero and m off ‖W‖, so c ≠ 1."""
    from torch import nn
    torch.manual_seed(0)
    base = nn.Linear(k, n, device=device, dtype=torch.bfloat16)
    base.requires_grad_(False)
    if impl == "bare":
        return base
    if impl == "peft":
        from peft import LoraConfig, get_peft_model
        from tools.layers import _Holder
        layer = get_peft_model(_Holder(base), LoraConfig(
            r=r, lora_alpha=r, target_modules=["proj"], use_dora=dora,
            lora_dropout=DROPOUT_P if dropout else 0.0))
        for name, param in layer.named_parameters():
            if "lora_A" in name and method == "lora_fa":
                param.requires_grad_(False)
            if dora and "lora_B" in name:
                torch.nn.init.normal_(param, std=0.01)
        return layer
    from lowrank_fused import LowRankLinear
    layer = LowRankLinear.from_linear(base, r, method, backend=impl, dora=dora,
                                      dropout=DROPOUT_P if dropout else 0.0).train()
    if dora:
        with torch.no_grad():
            layer.lora_b.normal_(0, 0.01)
            layer.magnitude.mul_(1.1)
    return layer


def probe_layers(probe: Probe, label, m, k, n, r, method, dropout, backends):
    """fwd and fwd+bwd of whole layers under bf16 autocast, with ratios to bare and PEFT."""
    import importlib.util
    dm, dk, dn = _dims(probe, m, k, n)
    dev = probe.device
    impls = ["bare"] + (["peft"] if importlib.util.find_spec("peft") else []) + list(backends)
    case = model.Case(method, m, k, n, r, dropout)
    x = torch.randn(dm, dk, device=dev, dtype=torch.bfloat16, requires_grad=True)
    g = torch.randn(dm, dn, device=dev, dtype=torch.bfloat16)
    tag = f"{label} r={r} {method} dropout={'on' if dropout else 'off'}"
    times = {}
    for impl in impls:
        layer = _layer(impl, dk, dn, r, method, dropout, dev)
        name = {"bare": "bare", "peft": "peft"}.get(impl, impl)

        def fwd():
            with torch.autocast(dev.type, dtype=torch.bfloat16):
                return layer(x)

        def fwd_bwd():
            fwd().backward(g)

        for mode, fn, backward in (("fwd", fwd, False), ("fwd+bwd", fwd_bwd, True)):
            predicted = model.predict(name, case, probe.code, probe.hw, backward)
            times[impl, mode] = (probe.add(f"{tag} {mode} {impl}", predicted, fn), predicted)
    for impl in impls[1:]:
        for mode in ("fwd", "fwd+bwd"):
            for ref in ("bare", "peft"):
                if ref == impl or (ref, mode) not in times:
                    continue
                (mine, mine_p), (theirs, theirs_p) = times[impl, mode], times[ref, mode]
                probe.record({
                    "name": f"{tag} {mode} {impl}/{ref}",
                    "predicted_ratio": round(mine_p / theirs_p, 3),
                    "measured_ratio": None if mine is None else round(mine / theirs, 3)})


def probe_dora(probe: Probe, label, m, k, n, r, method, dropout):
    """DoRA layers (fwd and fwd+bwd under bf16 autocast): the Triton backend against a bare
    frozen nn.Linear, PEFT's use_dora and the reference backend (what DoRA ran on before);
    measured only (tools.model has no DoRA passes: predictions are None)."""
    import importlib.util
    dm, dk, dn = _dims(probe, m, k, n)
    dev = probe.device
    impls = (["bare"] + (["peft"] if importlib.util.find_spec("peft") else [])
             + ["reference", "triton"])
    x = torch.randn(dm, dk, device=dev, dtype=torch.bfloat16, requires_grad=True)
    g = torch.randn(dm, dn, device=dev, dtype=torch.bfloat16)
    tag = f"{label} r={r} dora {method} dropout={'on' if dropout else 'off'}"
    times = {}
    for impl in impls:
        layer = _layer(impl, dk, dn, r, method, dropout, dev, dora=True)

        def fwd():
            with torch.autocast(dev.type, dtype=torch.bfloat16):
                return layer(x)

        def fwd_bwd():
            fwd().backward(g)

        for mode, fn in (("fwd", fwd), ("fwd+bwd", fwd_bwd)):
            times[impl, mode] = probe.add(f"{tag} {mode} {impl}", None, fn)
    for mode in ("fwd", "fwd+bwd"):
        for ref in impls[:-1]:
            if (ref, mode) in times:
                mine, theirs = times["triton", mode], times[ref, mode]
                probe.record({"name": f"{tag} {mode} triton/{ref}", "predicted_ratio": None,
                              "measured_ratio": None if mine is None or theirs is None
                              else round(mine / theirs, 3)})
def probe_qlora(probe: Probe, label, m, k, n, r, method, dropout):
    """Issue 23's target: the Triton backend's fwd+bwd over a bitsandbytes NF4 W (nested
    absmax, blocksize 64; dequantized inside the GEMMs' K loops) against the same layer over
    the dequantized bf16 W, with the model's prediction (serial dequantization) and ratio."""
    import importlib.util
    if importlib.util.find_spec("bitsandbytes") is None:
        probe.record({"name": f"{label} r={r} {method} qlora", "skipped":
                      "bitsandbytes is not installed"})
        return
    import bitsandbytes as bnb
    from lowrank_fused import low_rank_linear, quantized
    dm, dk, dn = _dims(probe, m, k, n)
    dev = probe.device
    g = torch.Generator().manual_seed(0)
    w = (torch.randn(dn, dk, generator=g) / dk ** 0.5).to(torch.bfloat16)
    weight_4bit = bnb.nn.Params4bit(w, requires_grad=False, quant_type="nf4", blocksize=64,
                                    compress_statistics=True).to(dev)
    dense = quantized.dequantize(weight_4bit, torch.bfloat16)
    x = torch.randn(dm, dk, device=dev, dtype=torch.bfloat16, requires_grad=True)
    grad = torch.randn(dm, dn, device=dev, dtype=torch.bfloat16)
    lora_a = (torch.randn(r, dk, device=dev) / dk ** 0.5).requires_grad_(method == "lora")
    lora_b = (torch.randn(dn, r, device=dev) * 0.01).requires_grad_(method != "lora_xs")
    latent = torch.zeros(r, r, device=dev, requires_grad=True) if method == "lora_xs" else None
    tag = f"{label} r={r} {method} dropout={'on' if dropout else 'off'} qlora"
    times = {}
    for name, weight, quant in (("4bit", weight_4bit, "nf4"), ("dense bf16", dense, "")):
        def fwd_bwd(weight=weight):
            low_rank_linear(x, weight, lora_a, lora_b, latent=latent, scaling=2.0,
                            dropout_p=DROPOUT_P if dropout else 0.0, dropout_seed=7,
                            backend="triton").backward(grad)
        case = model.Case(method, m, k, n, r, dropout, quant=quant)
        predicted = model.predict("triton", case, probe.code, probe.hw, True)
        times[name] = (probe.add(f"{tag} fwd+bwd triton {name}", predicted, fwd_bwd), predicted)
    (mine, mine_p), (theirs, theirs_p) = times["4bit"], times["dense bf16"]
    probe.record({"name": f"{tag} fwd+bwd 4bit/dense", "target_ratio": 1.1,
                  "predicted_ratio": round(mine_p / theirs_p, 3),
                  "measured_ratio": None if mine is None else round(mine / theirs, 3)})


SHAPE_11008_4096 = ("11008→4096", 8192, 11008, 4096)
METHODS = ("lora_fa", "lora", "lora_xs")


def probe_model(probe: Probe, dry: bool) -> None:
    """The model benchmark's fastest case (tools/model_level.py): a BERT-style encoder at
    RoBERTa-large width, LoRA-FA, bf16 base, lora_dropout 0.05, PEFT against enable_fused."""
    from tools import model_level as ml
    shape = ml.PRESETS["tiny" if dry else "compass"].shapes["bert"]
    case = ml.Case("bert", "lora_fa", "bfloat16", 0.05, shape)
    figures = ml.run_case(case, probe.device, warmup=0 if dry else 1, repeats=1 if dry else 5)
    probe.record({"name": f"model {case.id}", **figures})


def first_groups(probe: Probe, dry: bool) -> list:
    """(name, callable) groups of tools.first's speed step, most decisive first: the Triton
    GEMMs against cuBLAS, then each method against bare and PEFT at 4096², r = 16, dropout off
    and on, the per-kernel breakdown there, QLoRA's 4-bit layer against its dense bf16 twin,
    the model case, DoRA (Triton against bare, PEFT's use_dora and the reference backend), the
    FFN shapes, r = 64. A dry run keeps the groups
    whose code differs (the rest only repeat them at other shapes)."""
    square, wide = SHAPES
    groups = [(f"gemm {square[0]}", lambda: probe_gemms(probe, *square))]

    def layers(shape, r, dropout):
        return (f"layers {shape[0]} r={r} dropout={'on' if dropout else 'off'}",
                lambda: [probe_layers(probe, *shape, r, method, dropout, ["triton"])
                         for method in METHODS])

    def kernels(shape, r, dropout):
        return (f"kernels {shape[0]} r={r} lora dropout={'on' if dropout else 'off'}",
                lambda: probe_kernels(probe, *shape, r, "lora", dropout))

    def dora(shape, r, dropout):
        return (f"dora {shape[0]} r={r} dropout={'on' if dropout else 'off'}",
                lambda: [probe_dora(probe, *shape, r, method, dropout)
                         for method in ("lora", "lora_fa")])

    groups += [layers(square, 16, False), layers(square, 16, True),
               kernels(square, 16, False), kernels(square, 16, True),
               (f"qlora {square[0]} r=16 lora_fa dropout=off",
                lambda: probe_qlora(probe, *square, 16, "lora_fa", False)),
               ("model bert lora_fa bf16 dropout=0.05", lambda: probe_model(probe, dry)),
               dora(square, 16, False), dora(square, 16, True)]
    if dry:
        return groups
    groups += [layers(wide, 16, False), layers(SHAPE_11008_4096, 16, False),
               layers(square, 64, False), layers(square, 64, True),
               layers(wide, 16, True), layers(SHAPE_11008_4096, 16, True),
               (f"gemm {wide[0]}", lambda: probe_gemms(probe, *wide)),
               layers(wide, 64, False), layers(SHAPE_11008_4096, 64, False),
               layers(wide, 64, True), layers(SHAPE_11008_4096, 64, True)]
    return groups


def run(out: str, quick: bool = False, budget_s: float = 170.0) -> dict:
    """Probe in order of importance, rewriting ``out`` after every group so a cut-off run
    still leaves its figures; groups not started within ``budget_s`` are listed as skipped."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type != "cuda":
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before the kernels are imported
    from lowrank_fused import available_backends
    hw, code = model.Hardware(), model.Code()
    probe = Probe(device, hw, code)
    backends = ["triton"] + (["cuda"] if device.type == "cuda"
                             and "cuda" in available_backends() else [])
    start = time.time()
    shapes = SHAPES[:1] if quick or probe.dry else SHAPES
    ranks = RANKS[:1] if quick else RANKS
    groups = [(f"gemm {label}", lambda s=shape: probe_gemms(probe, *s))
              for shape in shapes for label in [shape[0]]]
    for shape in shapes:
        for r in ranks:
            for dropout in (False, True):
                for method in ("lora_fa", "lora"):
                    args = (probe, *shape, r, method, dropout)
                    groups.append((f"{shape[0]} r={r} {method} dropout={dropout}",
                                   lambda a=args: (probe_kernels(*a), probe_layers(*a, backends))))
    result = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu (dry run)",
              "dry_run": probe.dry, "torch": torch.__version__, "backends": backends,
              "hardware_assumed": vars(hw), "code_assumed": vars(code),
              "skipped": [], "figures": probe.figures}
    for name, group in groups:
        if time.time() - start > budget_s:
            result["skipped"].append(name)
            continue
        try:
            group()
        except Exception as exc:  # noqa: BLE001  (one broken group must not waste the run)
            result.setdefault("errors", []).append(f"{name}: {type(exc).__name__}: {exc}"[:300])
            print(f"probe: {name} failed: {exc}", file=sys.stderr, flush=True)
            if probe.dry:
                raise  # on CPU a failure is a bug to fix before any GPU run
        result["seconds"] = round(time.time() - start, 1)
        with open(out, "w") as f:
            json.dump(result, f, indent=0, ensure_ascii=False)
    with open(out, "w") as f:
        json.dump(result, f, indent=0, ensure_ascii=False)
    print(f"probe: {len(probe.figures)} figures in {result.get('seconds')} s, "
          f"{len(result['skipped'])} groups skipped (budget {budget_s:.0f} s) -> {out}")
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, metavar="PATH", help="where to write the JSON")
    parser.add_argument("--quick", action="store_true", help="first shape and rank only")
    parser.add_argument("--budget-s", type=float, default=170.0,
                        help="start no new group after this many seconds (default 170)")
    args = parser.parse_args(argv)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    run(args.out, args.quick, args.budget_s)
    return 0


if __name__ == "__main__":
    sys.exit(main())
