"""The first GPU run: the whole speed matrix, correctly, in one call of at most 420 s.

    python -m tools.first NAME [--results DIR] [--budget-s S] [--steps a,b] [--groups P,Q]
                               [--resume] [--dry-run]
    bash tools/gpu_session.sh first NAME [the same options]   (what the device tool runs)

It runs from the tree as copied (uninstalled), installs nothing, and writes every figure as
one JSON line, flushed at once, to RESULTS/NAME.first.jsonl and, when $OUT is set, to
$OUT/NAME.first.jsonl: a run killed at any point keeps what it measured. Every row carries the
commit (``LOWRANK_FUSED_COMMIT``, set by the call: .git does not travel) and the autotune mode
it ran under. Each step runs in its own process; a step's deadline is the run's start plus the
budgets of the steps up to it (``STEPS``), so time one step leaves goes to the next, and the
whole run stays within their sum. A step out of time is killed and recorded as such; work not
started in time is recorded as skipped, with the reason. A CUDA error ends its step (a row names
the case): the step starts again in a fresh process with what is left, up to twice.

1. env: GPU and its properties (L2 size), clocks and temperature (nvidia-smi; again after every
   step), driver, versions of every package that matters (from their metadata: nothing missing
   is imported), which of peft, transformers and bitsandbytes import, bitsandbytes' native
   library, the LOWRANK_FUSED_* / TRITON_* / BNB_* environment, gcc, Python.h, nvcc, and
   tools.model's hardware and code constants.
2. correctness: the Triton backend against float64 under the tests' tolerance rule, forward
   and every gradient, inputs drawn on the GPU (``correctness_cases``: bf16 base at r = 16,
   tiled and TMA GEMMs; 4-bit NF4 / FP4; DoRA; r = 64 for every family; then the fp32 cases,
   among them LoRA-XS at the shape that failed on an H200), under quick autotuning: it also
   compiles most of the matrix's kernels.
3. speed: tools.probe's plan (matrix first, then calibration under full autotuning, dropout on,
   GEMMs against cuBLAS, per-kernel breakdown, first training step, model case), each group
   with its estimated seconds; a group whose estimate no longer fits is skipped, saying so.
4. cuda: the CUDA extension, built in the background from the start for this GPU's arch alone
   (skipped with the reason where nvcc is missing or its CUDA major differs from torch's), then
   the plain methods on CUDA C++ beside Triton at the matrix points, its correctness cases, and
   tests/test_csrc.py's GPU tests with the time left.

Dry run (no GPU; CI): the same steps on tiny CPU shapes (Triton on the interpreter), timed on
the wall clock, the build skipped with its reason; exits non-zero if a step fails, a check
fails or a contender raises (a contender missing its package is not a failure).
"""
from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import time
import traceback
import warnings
import zlib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# (step, seconds), in order. Their sum, 410 s, is the run's own budget, inside the 420 s a lent
# machine's first command may take (its start aside); the driver's own start-up and the step
# processes' (Python, torch, CUDA context) are counted inside the steps.
STEPS = (("env", 15), ("correctness", 110), ("speed", 240), ("cuda", 45))
TOTAL_BUDGET_S = 420.0
LLAMA = (4096, 4096, 4096, 16)  # M, K, N, r of the correctness step
DRY = (37, 80, 48, 16)  # odd M, K not a multiple of a tile: the CPU stand-in
DROPOUT_P = 0.1
CUDA_ERROR_RC = 3  # a step ended by a CUDA error: the driver starts it again
RESTARTS = 2
COMMIT_ENV = "LOWRANK_FUSED_COMMIT"
PACKAGES = ("torch", "triton", "numpy", "peft", "transformers", "accelerate", "bitsandbytes",
            "safetensors", "huggingface-hub", "matplotlib", "pytest", "packaging",
            "typing-extensions")


def autotune_mode() -> str:
    """LOWRANK_FUSED_AUTOTUNE as the kernels read it ("full" when unset)."""
    return os.environ.get("LOWRANK_FUSED_AUTOTUNE") or "full"


class Sink:
    """Appends JSON lines to each path, flushed and closed per line (a kill loses nothing).
    Every row gets the commit and the autotune mode of the moment (a row naming its own
    autotune mode keeps it)."""

    def __init__(self, paths):
        self.paths = list(paths)

    def __call__(self, **row):
        row.setdefault("autotune", autotune_mode())
        row.setdefault("commit", os.environ.get(COMMIT_ENV) or None)
        line = json.dumps(row, ensure_ascii=False, default=str) + "\n"
        for path in self.paths:
            with open(path, "a") as f:
                f.write(line)
        shown = {k: v for k, v in row.items() if k not in ("step", "commit", "autotune")}
        text = json.dumps(shown, default=str, ensure_ascii=False)
        print(f"[{row.get('step', '-')}] {text[:240]}", flush=True)

    def sync(self) -> None:
        """Makes every copy equal to the first: a step killed between its writes to the two
        copies leaves the first one line ahead (rename, so a kill here leaves a whole file)."""
        with open(self.paths[0]) as f:
            text = f.read()
        for path in self.paths[1:]:
            tmp = f"{path}.tmp"
            with open(tmp, "w") as f:
                f.write(text)
            os.replace(tmp, path)


def _sink_paths(results: str, name: str) -> list:
    paths = [os.path.join(results, f"{name}.first.jsonl")]
    if os.environ.get("OUT"):
        paths.append(os.path.join(os.environ["OUT"], f"{name}.first.jsonl"))
    return paths


def rows(path) -> list:
    """The rows written so far (a line cut by a kill is left out)."""
    if not os.path.exists(path):
        return []
    out = []
    with open(path) as f:
        for line in f:
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return out


def _run(cmd, timeout=30) -> str:
    """The first line a command prints, or why there is none."""
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        text = (done.stdout or done.stderr).strip()
        return text.splitlines()[0] if text else f"rc {done.returncode}"
    except (OSError, subprocess.TimeoutExpired) as err:
        return f"unavailable ({type(err).__name__})"


GPU_QUERY = "clocks.sm,clocks.mem,clocks.max.sm,temperature.gpu,power.draw,pstate"
# what limits the clocks: the field's newer name first (older drivers know only the second)
GPU_REASONS = ("clocks_event_reasons.active", "clocks_throttle_reasons.active")


def _smi(fields: str) -> list:
    line = _run(["nvidia-smi", f"--query-gpu={fields}", "--format=csv,noheader"], 20)
    values = [v.strip() for v in line.split(",")]
    return values if len(values) == len(fields.split(",")) else [line]


def gpu_state() -> dict:
    """nvidia-smi's clocks, temperature, power and clock-limit reasons now (no torch import)."""
    if not shutil.which("nvidia-smi"):
        return {"nvidia_smi": "not found"}
    values = _smi(GPU_QUERY)
    state = (dict(zip(GPU_QUERY.split(","), values)) if len(values) > 1
             else {"nvidia_smi": values[0]})
    for field in GPU_REASONS:
        reason = _smi(field)[0]
        if reason.startswith("0x"):
            state[field] = reason
            break
    return state


# ---------------------------------------------------------------------------------- step 1


def package_versions() -> dict:
    """Installed versions from metadata (None: not installed); nothing is imported."""
    out = {}
    for name in PACKAGES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    return out


def importable(name: str) -> bool:
    import importlib.util
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def bitsandbytes_library() -> str:
    """Which native library bitsandbytes loaded here (it is imported only where it imports)."""
    if not importable("bitsandbytes"):
        return "bitsandbytes is not installed"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import bitsandbytes.cextension as ce
        lib = getattr(getattr(ce, "lib", None), "_lib", None)
        return f"{getattr(ce, 'BNB_BACKEND', '?')}: {getattr(lib, '_name', lib)}"
    except Exception as exc:  # noqa: BLE001
        return f"import failed: {type(exc).__name__}: {exc}"[:300]


def step_env(sink, dry: bool, deadline: float) -> None:
    import torch
    import triton

    import lowrank_fused
    from tools import model
    row = dict(python=sys.version.split()[0], executable=sys.executable,
               lowrank_fused=os.path.dirname(lowrank_fused.__file__),
               torch=torch.__version__, torch_cuda=torch.version.cuda, triton=triton.__version__,
               versions=package_versions(),
               importable={n: importable(n) for n in ("peft", "transformers", "bitsandbytes")},
               bitsandbytes_library=bitsandbytes_library(),
               environment={k: v for k, v in sorted(os.environ.items())
                            if k.startswith(("LOWRANK_FUSED_", "TRITON_", "BNB_", "CUDA_"))
                            or k in ("PYTHONPATH",)},
               gcc=_run(["gcc", "--version"]),
               python_h=os.path.isfile(os.path.join(sysconfig.get_paths()["include"],
                                                    "Python.h")),
               nvcc=shutil.which("nvcc"), nvcc_release=nvcc_release(),
               model_hardware=vars(model.Hardware()), model_code=vars(model.Code()))
    if not row["importable"]["bitsandbytes"]:
        row["bitsandbytes_hint"] = ("carry the slimmed copy: python tools/prepare_bitsandbytes.py "
                                    "(docs/gpu-session.md)")
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        row.update(gpu=props.name, capability=list(torch.cuda.get_device_capability(0)),
                   sms=props.multi_processor_count,
                   memory_gib=round(props.total_memory / 2**30, 1),
                   l2_cache_mib=round(getattr(props, "L2_cache_size", 0) / 2**20, 1),
                   driver=_run(["nvidia-smi", "--query-gpu=driver_version",
                                "--format=csv,noheader"]),
                   gpu_state=gpu_state())
    else:
        row.update(gpu="cpu (dry run)" if dry else None)
    sink(step="env", kind="env", **row)


def nvcc_release():
    """nvcc's "release X.Y" as a string, or None."""
    if not shutil.which("nvcc"):
        return None
    text = subprocess.run(["nvcc", "--version"], capture_output=True, text=True).stdout
    found = re.search(r"release (\d+\.\d+)", text)
    return found.group(1) if found else None


# ---------------------------------------------------------------------------------- step 2


TRAINS = {"lora": ("lora_a", "lora_b", "bias"), "lora_fa": ("lora_b",), "lora_xs": ("latent",),
          # DoRA (magnitude=): with A trainable, and DoRA-FA (A frozen)
          "dora": ("lora_a", "lora_b", "bias", "magnitude"), "dora_fa": ("lora_b", "magnitude")}
# tests/test_triton.py's case that failed on an H200 (benchmarks/results/h200-dev-run6.log):
# M = 37, K = 100, N = 80, r = 1, fp32 base and adapters, bias, no dropout, LoRA-XS
H200_XS_SHAPE = (37, 100, 80, 1)
KNOWN_XS_FAILURE = ("dR misses the tolerance rule by ~2x on an H200 (h200-dev-run6.log) and on "
                    "the interpreter alike: recorded, not counted as a dry run's failure")


def correctness_cases(dry: bool):
    """(label, settings) in the order they run: the default setup first, then 4-bit, DoRA,
    r = 64 for every family, the fp32 cases last. ``shape`` (M, K, N, r) where it is not the
    step's shape."""
    import torch
    bf16, fp32 = torch.bfloat16, torch.float32
    cases = []
    for adapter in (fp32, bf16):
        for dropout in (False, True):
            for method in ("lora", "lora_fa", "lora_xs"):
                for variant in ("tiled", "tma"):
                    cases.append(dict(base=bf16, adapter=adapter, method=method,
                                      dropout=dropout, variant=variant, tf32=False))
    # QLoRA: a bitsandbytes 4-bit W, dequantized inside the Triton GEMMs' K loops (NF4 nested,
    # what BitsAndBytesConfig's double quantization loads; FP4 plain). A dry run keeps the one
    # with the most code in it (nested absmax, dx with dropout, dA), at a K the blocksize
    # divides: the aligned path a GPU run's K = 4096 takes.
    four_bit = [dict(method=method, dropout=dropout, adapter=fp32, quant="nf4", nested=True)
                for method in ("lora_fa", "lora", "lora_xs") for dropout in (False, True)]
    four_bit.append(dict(method="lora", dropout=True, adapter=bf16, quant="fp4", nested=False))
    for c in four_bit[3:4] if dry else four_bit:
        cases.append(dict(base=bf16, variant="tiled", tf32=False, **c,
                          **({"shape": (37, 64, 48, 16)} if dry else {})))
    # DoRA (tiled GEMMs only)
    for dropout in (False, True):
        for method in ("dora", "dora_fa"):
            cases.append(dict(base=bf16, adapter=fp32, method=method, dropout=dropout,
                              variant="tiled", tf32=False))
    # r = 64 (its RANK_BLOCK compiles other kernels): every family, dropout on (a dry run, on
    # the interpreter where nothing compiles, keeps a plain and a DoRA one at r = 32)
    r64 = 32 if dry else 64
    for method in ("lora", "dora") if dry else ("lora", "lora_fa", "lora_xs", "dora", "dora_fa"):
        cases.append(dict(base=bf16, adapter=fp32, method=method, dropout=True, variant="tiled",
                          tf32=False, rank=r64))
    if not dry:
        cases.append(dict(base=bf16, adapter=fp32, method="lora", dropout=True,
                          variant="tiled", tf32=False, quant="nf4", nested=True, rank=r64))
    # fp32 bases
    cases.append(dict(base=fp32, adapter=fp32, method="dora", dropout=True, variant="tiled",
                      tf32=True))
    for tf32 in (False, True):
        for dropout in (False, True):
            cases.append(dict(base=fp32, adapter=fp32, method="lora", dropout=dropout,
                              variant="tiled", tf32=tf32))
    cases.append(dict(base=fp32, adapter=fp32, method="lora_xs", dropout=False,
                      variant="tiled", tf32=False, shape=H200_XS_SHAPE, scaling=0.5,
                      known_failure=KNOWN_XS_FAILURE))
    return [(_label(c), c) for c in cases]


def case_shape(c, dry: bool) -> tuple:
    """(M, K, N, r) of a case: its own shape, else the step's with the case's rank."""
    if "shape" in c:
        return tuple(c["shape"])
    m, k, n, r = DRY if dry else LLAMA
    return m, k, n, c.get("rank", r)


def case_seed(label: str) -> int:
    """A case's seed, from its label: the same inputs whatever cases come before it."""
    return zlib.crc32(label.encode()) % 100_000


def _label(c) -> str:
    name = lambda dt: str(dt).replace("torch.", "")  # noqa: E731
    if c.get("quant"):
        return (f"{c['method']} base={c['quant']}{' nested' if c['nested'] else ''} "
                f"(computing in {name(c['base'])}) adapters={name(c['adapter'])} "
                f"dropout={'on' if c['dropout'] else 'off'}")
    return (f"{c['method']} base={name(c['base'])} adapters={name(c['adapter'])} "
            f"dropout={'on' if c['dropout'] else 'off'} gemm={c['variant']}"
            + (f" tf32={'on' if c['tf32'] else 'off'}" if name(c["base"]) == "float32" else ""))


def _case_tensors(c, shape, device, seed):
    """The case's tensors, drawn on ``device`` (a CUDA generator on a GPU)."""
    import torch
    m, k, n, r = shape
    g = torch.Generator(device=device).manual_seed(seed)

    def t(*size, dtype, scale=1.0):
        return (torch.randn(*size, generator=g, device=device, dtype=torch.float32)
                * scale).to(dtype)

    weight, weight_4bit = t(n, k, dtype=c["base"], scale=k ** -0.5), None
    if c.get("quant"):  # W as bitsandbytes quantizes it; the dense W is its dequantized values
        import bitsandbytes as bnb
        from lowrank_fused import quantized
        weight_4bit = bnb.nn.Params4bit(weight.cpu(), requires_grad=False,
                                        quant_type=c["quant"], blocksize=64,
                                        compress_statistics=c["nested"]).to(device)
        weight = quantized.dequantize(weight_4bit, c["base"])
    return dict(x=t(m, k, dtype=c["base"]), weight=weight, weight_4bit=weight_4bit,
                bias=t(n, dtype=c["base"]), lora_a=t(r, k, dtype=c["adapter"], scale=k ** -0.5),
                lora_b=t(n, r, dtype=c["adapter"], scale=r ** -0.5),
                latent=t(r, r, dtype=c["adapter"], scale=r ** -0.5)
                if c["method"] == "lora_xs" else None,
                grad=t(m, n, dtype=c["base"]),
                # DoRA's m around ‖W_n‖ (≈ 1 here), not equal to it: c − 1 ≠ 0
                magnitude=(t(n, dtype=torch.float32, scale=0.2) + 1.0).to(c["adapter"])
                if c["method"].startswith("dora") else None)


def _call(tensors, c, backend, dtype=None, adapter_dtype=None, seed=7):
    """(y, {name: grad}) of one forward+backward, tensors cast to the dtypes given."""
    from lowrank_fused import low_rank_linear
    leaves = {}
    for name in ("x", "weight", "bias", "lora_a", "lora_b", "latent", "magnitude"):
        t = tensors[name]
        if t is None:
            leaves[name] = None
            continue
        cast = adapter_dtype if name in ("lora_a", "lora_b", "latent", "magnitude") else dtype
        if name == "weight" and tensors.get("weight_4bit") is not None and cast is None:
            leaves[name] = tensors["weight_4bit"]  # 4-bit: the Params4bit itself, frozen
            continue
        t = t.detach().to(cast or t.dtype)
        leaves[name] = t.requires_grad_(name == "x" or name in TRAINS[c["method"]])
    y = low_rank_linear(leaves["x"], leaves["weight"], leaves["lora_a"], leaves["lora_b"],
                        bias=leaves["bias"], latent=leaves["latent"],
                        scaling=c.get("scaling", 2.0),
                        dropout_p=DROPOUT_P if c["dropout"] else 0.0, dropout_seed=seed,
                        backend=backend, magnitude=leaves["magnitude"])
    names = [n for n, t in leaves.items() if t is not None and t.requires_grad]
    grad = tensors["grad"].to(y.dtype)
    grads = __import__("torch").autograd.grad(y, [leaves[n] for n in names], grad)
    return {"y": y.detach(), **dict(zip(names, grads))}


def check_case(c, shape, device, seed, backend="triton") -> dict:
    """The backend against float64 under the tolerance rule (lowrank_fused/tolerance.py, the
    tests' rule): {"ok", "failures", ...}."""
    import torch
    from lowrank_fused.tolerance import kernel_mismatch
    tensors = _case_tensors(c, shape, device, seed)
    # torch's own switch, which the kernels follow (configs.dot_precision) and cuBLAS obeys
    torch.set_float32_matmul_precision("high" if c["tf32"] else "highest")
    try:
        got = _call(tensors, c, backend)
        again = _call(tensors, c, backend)  # the same call twice: kept accumulators
        want = _call(tensors, c, "reference", torch.float64, torch.float64)
        # PyTorch's same math: over a 16-bit base the kernels multiply the low-rank operands in
        # the base's dtype, so the reference with the adapters in that dtype
        low_adapter = c["base"] if c["base"] != torch.float32 else c["adapter"]
        low = _call(tensors, c, "reference", None, low_adapter)
    finally:
        torch.set_float32_matmul_precision("highest")
    failures, errors = [], {}
    for name in want:
        for label, result in (("", got), (" (2nd call)", again)):
            message = kernel_mismatch(result[name], want[name], low[name].to(result[name].dtype),
                                      name + label, c["base"])
            if message is not None:
                failures.append(message[:300])
        errors[name] = float((got[name].double() - want[name]).abs().max())
    repeat = {n: float((again[n].double() - got[n].double()).abs().max()) for n in got
              if n != "y" and n != "x"}
    return dict(ok=not failures, failures=failures, max_error=errors, second_call_diff=repeat)


def check_keep_mask(device) -> dict:
    """Triton's keep-mask against the reference's, bit for bit, at an odd shape."""
    import torch
    from lowrank_fused import triton_kernels as tk
    from lowrank_fused.dropout import DropoutSpec, keep_mask
    shape, spec = (37, 1000), DropoutSpec(0.1, 2 ** 31 + 5)
    got = tk.dropout_keep_mask(spec.seed, spec.quantised_p, shape, device).cpu()
    want = keep_mask(spec.seed, spec.p, torch.arange(shape[0]), torch.arange(shape[1]))
    return dict(ok=bool(torch.equal(got, want)), mismatches=int((got != want).sum()))


class CudaErrorEndsStep(RuntimeError):
    """A CUDA error in a case: every later case of this process would fail with it."""


def step_correctness(sink, dry: bool, deadline: float, backend="triton", cases=None,
                     done=()) -> int:
    """Runs the cases not in ``done`` (names recorded by an earlier process of this run, or
    --resume); returns how many failed. A CUDA error raises CudaErrorEndsStep after its row."""
    import torch
    os.environ["LOWRANK_FUSED_AUTOTUNE"] = "quick"  # correctness: one config, no timing
    os.environ["LOWRANK_FUSED_VERIFY"] = "off"  # the kernels themselves, never the fallback
    device = torch.device("cpu" if dry else "cuda")
    step = "correctness" if backend == "triton" else "cuda"
    failed = 0
    keep_mask_name = "keep-mask vs reference, 37 x 1000"
    if backend == "triton" and keep_mask_name not in done:
        failed += not _timed(sink, step, keep_mask_name, deadline,
                             lambda: check_keep_mask(device), device)
    have_bnb = importable("bitsandbytes")
    for label, c in cases or correctness_cases(dry):
        shape = case_shape(c, dry)
        name = f"{backend} {label} M,K,N,r={shape}"
        if name in done:
            continue
        if c.get("quant") and not have_bnb:
            sink(step=step, name=name, skipped="bitsandbytes is not installed")
            continue
        os.environ["LOWRANK_FUSED_TRITON_GEMM"] = c["variant"]
        sink(step=step, name=name, kind="started")  # a process that dies here is traced to it
        ok = _timed(sink, step, name, deadline,
                    lambda: check_case(c, shape, device, case_seed(label), backend), device,
                    known_failure=c.get("known_failure"))
        failed += not ok and not c.get("known_failure")
    os.environ.pop("LOWRANK_FUSED_TRITON_GEMM", None)
    return failed


def cuda_error(exc: BaseException, device) -> bool:
    """tools.probe.cuda_error where a device is given (never on a CPU)."""
    if device is None or device.type != "cuda":
        return False
    from tools.probe import cuda_error as broken
    return broken(exc, device)


def _timed(sink, step, name, deadline, fn, device=None, known_failure=None) -> bool:
    """Runs fn() if the step's time allows; records its result (with ``known_failure``, the
    note of a case known to fail, when it fails), error or skip. False when it ran and failed.
    A CUDA error raises CudaErrorEndsStep after its row."""
    if time.time() > deadline:
        sink(step=step, name=name, skipped="out of time")
        return True
    start = time.time()
    try:
        result = fn()
    except Exception as exc:  # noqa: BLE001  (one broken case must not waste the run)
        error = f"{type(exc).__name__}: {exc}"[:400]
        if cuda_error(exc, device):
            sink(step=step, name=name, seconds=round(time.time() - start, 2), ok=False,
                 error=error, cuda_error=True, ends_step=True)
            raise CudaErrorEndsStep(name) from exc
        result = dict(ok=False, error=error)
    if known_failure and not result["ok"]:
        result["known_failure"] = known_failure
    sink(step=step, name=name, seconds=round(time.time() - start, 2), **result)
    return result["ok"]


# ---------------------------------------------------------------------------------- step 3


def _speed_groups(probe, dry: bool, prefixes, cuda_step: bool = False) -> list:
    from lowrank_fused import available_backends
    from tools import probe as probes
    if cuda_step:
        groups = probes.cuda_plan(probe)
    else:
        groups = probes.plan(probe, not dry and "cuda" in available_backends())
    return probes.selected(groups, prefixes)


def step_speed(sink, dry: bool, deadline: float, prefixes=None, cuda_step: bool = False) -> int:
    """Runs the plan's groups not finished in the file; returns the number of groups (dry run:
    or contenders) that raised. A CUDA error raises CudaErrorEndsStep after its row."""
    import torch
    from tools import model, probe as probes
    os.environ["LOWRANK_FUSED_AUTOTUNE"] = "quick"  # the matrix: compile once, no tuning
    step = "cuda" if cuda_step else "speed"
    device = torch.device("cpu" if dry else "cuda")
    p = probes.Probe(device, model.Hardware(), model.Code(),
                     sink=lambda row: sink(step=step, **row))
    written = rows(sink.paths[0])
    for name in died_in(written, step, "group"):
        sink(step=step, kind="group", group=name, status="died in it",
             error="the step's process died in this group (signal or CUDA error); not retried")
    done = groups_done(rows(sink.paths[0]))
    broken = 0
    for group in _speed_groups(p, dry, prefixes, cuda_step):
        if group.name in done:  # measured by an earlier process of this run, or --resume
            continue
        left = deadline - time.time()
        if left <= 0 or (not dry and group.est_s > left):
            sink(step=step, kind="group", group=group.name, status="skipped",
                 skipped=f"out of time: estimated {group.est_s:.0f} s, {max(left, 0):.0f} s left",
                 est_s=group.est_s)
            continue
        start = time.time()
        status, error = "done", None
        sink(step=step, kind="group", group=group.name, status="started", est_s=group.est_s)
        # verified first use stays on, as users run it: a key it sends to the reference path
        # warns, and its times are then not the kernels'
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                group.run()
            except probes.FatalCudaError as exc:
                sink(step=step, kind="group", group=group.name, status="ended by a CUDA error",
                     error=str(exc)[:400], group_seconds=round(time.time() - start, 1))
                raise CudaErrorEndsStep(group.name) from exc
            except Exception as exc:  # noqa: BLE001
                status, error = "error", f"{type(exc).__name__}: {exc}"[:400]
                broken += 1
                traceback.print_exc()  # the row keeps the message; the log, where it came from
                if not dry and cuda_error(exc, device):
                    sink(step=step, kind="group", group=group.name, status="ended by a CUDA error",
                         error=error, cuda_error=True)
                    raise CudaErrorEndsStep(group.name) from exc
        sink(step=step, kind="group", group=group.name, status=status, error=error,
             est_s=group.est_s, group_seconds=round(time.time() - start, 1),
             warnings=sorted({str(w.message)[:300] for w in caught})[:5])
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return broken + (p.errors if dry else 0)


def died_in(written, step: str, key: str) -> list:
    """The cases (key "name") or groups (key "group": their "group" rows only) of ``step``
    that an earlier process started and never finished: it died in them (a signal, a CUDA
    error that killed it)."""
    started, finished = [], set()
    for r in written:
        if r.get("step") != step or key not in r or (key == "group" and r.get("kind") != "group"):
            continue
        if r.get("kind") == "started" or r.get("status") == "started":
            started.append(r[key])
        else:
            finished.add(r[key])
    return [x for x in dict.fromkeys(started) if x not in finished]


def groups_done(written) -> set:
    """Names of the groups that ran to their end (or to a CUDA error) in the rows so far."""
    return {r["group"] for r in written if r.get("kind") == "group"
            and r.get("status") in ("done", "error", "ended by a CUDA error", "died in it")}


# ---------------------------------------------------------------------------------- step 4


def build_plan(dry: bool):
    """(command, env) of the CUDA extension build for this GPU alone, or (None, reason)."""
    import torch
    if dry or not torch.cuda.is_available():
        return None, "no GPU (dry run)"
    if torch.version.cuda is None:
        return None, f"torch {torch.__version__} is not a CUDA build"
    release = nvcc_release()
    if release is None:
        return None, "nvcc not found"
    if release.split(".")[0] != torch.version.cuda.split(".")[0]:
        return None, f"nvcc {release} and torch's CUDA {torch.version.cuda} differ in major"
    major, minor = torch.cuda.get_device_capability()
    arch = f"{major}{minor}" + ("a" if major == 9 else "")
    env = dict(os.environ, LOWRANK_FUSED_BUILD_CUDA="1", LOWRANK_FUSED_CUDA_ARCHS=arch,
               MAX_JOBS=str(os.cpu_count() or 4))
    return [sys.executable, "setup.py", "-q", "build_ext", "--inplace"], env


def step_cuda(sink, dry: bool, deadline: float, build_log: str, prefixes=None) -> int:
    """After the background build: the plain methods on CUDA C++ beside Triton at the matrix
    points, the CUDA backend's correctness cases, then its GPU tests."""
    from lowrank_fused import available_backends
    if "cuda" not in available_backends():
        sink(step="cuda", name="extension", skipped="lowrank_fused._C did not load",
             log=build_log)
        return 0
    written = rows(sink.paths[0])
    if any(r.get("kind") == "time" and r.get("backend") == "cuda" for r in written):
        sink(step="cuda", name="matrix cuda", skipped="the speed step's matrix timed CUDA C++ "
             "already (the extension was built before it began)")
        failed = 0
    else:
        failed = step_speed(sink, dry, deadline - 30, prefixes, cuda_step=True)
    # DoRA's and 4-bit calls asked of "cuda" run on Triton (dispatch.select): the correctness
    # step has them
    cases = [(label, c) for label, c in correctness_cases(dry)
             if c["variant"] == "tiled" and not c["method"].startswith("dora")
             and not c.get("quant") and "rank" not in c and "shape" not in c]
    done = {r["name"] for r in written if r.get("step") == "cuda" and "ok" in r}
    failed += step_correctness(sink, dry, deadline - 15, backend="cuda",
                               cases=cases[:12] + cases[-4:], done=done)
    left = deadline - time.time()
    if left < 10:
        sink(step="cuda", name="tests/test_csrc.py", skipped="out of time")
        return failed
    cmd = [sys.executable, "-m", "pytest", "tests/test_csrc.py", "-q", "-x", "-p",
           "no:cacheprovider", "-k", "cuda_backend_matches_reference"]
    try:
        done_run = subprocess.run(cmd, capture_output=True, text=True, timeout=left, cwd=ROOT)
        tail = (done_run.stdout + done_run.stderr).strip().splitlines()[-3:]
        sink(step="cuda", name="tests/test_csrc.py GPU cases", rc=done_run.returncode, tail=tail)
    except subprocess.TimeoutExpired:
        sink(step="cuda", name="tests/test_csrc.py GPU cases", skipped="out of time (killed)")
    return failed


# ---------------------------------------------------------------------------------- driver


def run_step(step: str, name: str, results: str, dry: bool, deadline: float,
             prefixes=None) -> int:
    """One step in this process: 0 done, 1 failed (dry run: a check or a contender failed),
    CUDA_ERROR_RC when a CUDA error ended it."""
    if dry:
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before the kernels are imported
    sys.path.insert(0, ROOT)
    sink = Sink(_sink_paths(results, name))
    try:
        if step == "env":
            step_env(sink, dry, deadline)
        elif step == "correctness":
            written = rows(sink.paths[0])
            for case in died_in(written, "correctness", "name"):
                sink(step="correctness", name=case, ok=False, error="the step's process died in "
                     "this case (signal or CUDA error); not retried")
            # checked already (a case skipped for time, or killed in, runs again)
            done = {r["name"] for r in rows(sink.paths[0])
                    if r.get("step") == "correctness" and "ok" in r}
            failed = step_correctness(sink, dry, deadline, done=done)
            if dry and failed:  # on the CPU a failure is a bug to fix before any GPU run
                return 1
        elif step == "speed":
            if step_speed(sink, dry, deadline, prefixes) and dry:
                return 1
        elif step == "cuda":
            if step_cuda(sink, dry, deadline, os.path.join(results, f"{name}.cuda_build.log"),
                         prefixes) and dry:
                return 1
    except CudaErrorEndsStep:
        return CUDA_ERROR_RC
    return 0


def step_command(name, results, step, deadline, dry, prefixes) -> list:
    """The command that runs one step in its own process."""
    return ([sys.executable, "-m", "tools.first", name, "--results", results, "--step", step,
             "--deadline", str(deadline)] + (["--dry-run"] if dry else [])
            + (["--groups", ",".join(prefixes)] if prefixes else []))


def budgets_for(steps=None, budget_s: float = None) -> dict:
    """{step: seconds} of the steps asked for, scaled to ``budget_s`` if given (env keeps its
    own, up to a quarter of it)."""
    budgets = {s: float(b) for s, b in STEPS if steps is None or s in steps}
    if budget_s is not None:
        env = min(budgets.get("env", 0.0), budget_s / 4)
        rest = sum(budgets.values()) - budgets.get("env", 0.0)
        scale = (budget_s - env) / rest if rest else 0.0
        budgets = {s: env if s == "env" else b * scale for s, b in budgets.items()}
    return budgets


def plan_row(budgets: dict, dry: bool, prefixes) -> dict:
    """What the run will do and what each part is expected to take (the speed groups'
    estimates are for an H100; a dry run runs them all on CPU shapes)."""
    speed = []
    if "speed" in budgets:
        import torch
        from tools import model, probe as probes
        p = probes.Probe(torch.device("cpu"), model.Hardware(), model.Code())
        speed = [(g.name, g.est_s) for g in probes.selected(probes.plan(p), prefixes)]
    cumulative, order = 0.0, []
    for group, est in speed:
        cumulative += est
        order.append({"group": group, "est_s": est, "cumulative_s": cumulative,
                      "fits": cumulative <= budgets["speed"]})
    return dict(steps={s: round(b, 1) for s, b in budgets.items()},
                budget_s=round(sum(budgets.values()), 1), limit_s=TOTAL_BUDGET_S, dry_run=dry,
                fits=sum(budgets.values()) <= TOTAL_BUDGET_S,
                correctness_cases=len(correctness_cases(dry)) if "correctness" in budgets else 0,
                speed_plan=order)


def run(name: str, results: str, dry: bool, budget_s: float = None, steps=None,
        resume: bool = False, prefixes=None) -> int:
    """The steps (default all), each in its own process; 0 when every step finished in time.
    ``resume``: append to the file and skip the cases and groups it already holds (a second
    command on a warm machine continues the first)."""
    start = time.time()  # the run's own accounting starts here: the plan's imports count
    os.makedirs(results, exist_ok=True)
    if os.environ.get("OUT"):
        os.makedirs(os.environ["OUT"], exist_ok=True)
    sink = Sink(_sink_paths(results, name))
    if not resume:
        for path in sink.paths:  # a fresh file per run
            open(path, "w").close()
    else:
        open(sink.paths[0], "a").close()
        sink.sync()  # $OUT starts empty on every command: it gets what the file holds
    budgets = budgets_for(steps, budget_s)
    sink(step="plan", kind="plan", resume=resume, groups=prefixes,
         autotune="correctness and speed: quick; the calibration group: full",
         **plan_row(budgets, dry, prefixes))
    build, failed = None, []
    build_log = os.path.join(results, f"{name}.cuda_build.log")
    end = start
    for step, budget in budgets.items():
        end += budget  # time an earlier step leaves goes to this one
        step_start, tries, status = time.time(), 0, "out of time (not started)"
        if step == "correctness" and "cuda" in budgets:  # the build runs beside steps 2 and 3
            build = _start_build(sink, dry, build_log)
        if step == "cuda" and build is not None:
            _finish_build(sink, build, build_log, end - 25)
            if os.environ.get("OUT"):
                shutil.copy(build_log, os.path.join(os.environ["OUT"], os.path.basename(build_log)))
        while time.time() < end:
            cmd = step_command(name, results, step, end - 2, dry, prefixes)
            try:
                rc = subprocess.run(cmd, cwd=ROOT, timeout=end - time.time()).returncode
            except subprocess.TimeoutExpired:
                status = "out of time (killed)"
                _close_killed(sink, step)
                break
            status = "done" if rc == 0 else f"failed (rc {rc})"
            if not (rc == CUDA_ERROR_RC or rc < 0) or tries >= RESTARTS:
                break
            # a CUDA error ended it, or a signal killed it: a fresh process takes what is left
            tries += 1
            sink.sync()
            sink(step=step, kind="restart", attempt=tries + 1,
                 after="a CUDA error" if rc == CUDA_ERROR_RC else f"signal {-rc}")
        if status != "done":
            failed.append(step)
        sink.sync()
        sink(step=step, kind="step", status=status, seconds=round(time.time() - step_start, 1),
             budget_s=round(budget, 1), restarts=tries, gpu_after=None if dry else gpu_state())
    if build is not None and build.poll() is None:
        build.kill()
    wall = time.time() - start
    sink(step="summary", kind="summary", wall_s=round(wall, 1), limit_s=TOTAL_BUDGET_S,
         within_limit=wall <= TOTAL_BUDGET_S, failed_steps=failed, **_tally(sink.paths[0]))
    return 1 if failed or wall > TOTAL_BUDGET_S else 0


def _close_killed(sink, step: str) -> None:
    """Rows for the case or group a step was killed in at its deadline: not a crash, so a
    --resume runs them again."""
    written = rows(sink.paths[0])
    for group in died_in(written, step, "group"):
        sink(step=step, kind="group", group=group, status="killed at the step's deadline")
    for case in died_in(written, step, "name"):
        sink(step=step, name=case, skipped="killed at the step's deadline")


def _tally(path) -> dict:
    """Checks passed and failed, skips, contenders missing, from the rows written so far."""
    counts = {"checks_passed": 0, "checks_failed": 0, "skipped": 0, "contenders_missing": 0,
              "timings": 0}
    for row in rows(path):
        if row.get("kind") == "missing":
            counts["contenders_missing"] += 1
        elif "skipped" in row:
            counts["skipped"] += 1
        elif "ok" in row:
            counts["checks_passed" if row["ok"] else "checks_failed"] += 1
        elif row.get("kind") == "time":
            counts["timings"] += 1
    return counts


def _start_build(sink, dry, log_path):
    import torch  # noqa: F401  (build_plan needs it; the parent imports it only here)
    cmd, env = build_plan(dry)
    if cmd is None:
        sink(step="cuda", name="build", skipped=env)
        return None
    sink(step="cuda", name="build", started=" ".join(cmd[1:]),
         archs=env["LOWRANK_FUSED_CUDA_ARCHS"])
    with open(log_path, "w") as log:  # the child keeps its own descriptor
        return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)


def _finish_build(sink, build, log_path, deadline):
    try:
        rc = build.wait(timeout=max(deadline - time.time(), 1))
        with open(log_path) as f:
            tail = f.read().strip().splitlines()[-5:]
        sink(step="cuda", name="build", rc=rc, tail=tail)
    except subprocess.TimeoutExpired:
        build.kill()
        sink(step="cuda", name="build", skipped="out of time (killed)")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("name", help="results are NAME.first.jsonl")
    parser.add_argument("--results", default=os.path.join(ROOT, "benchmarks", "results"))
    parser.add_argument("--dry-run", action="store_true", help="CPU, tiny shapes, wall clock")
    parser.add_argument("--budget-s", type=float, default=None,
                        help=f"scale the steps' budgets to this total (default "
                             f"{sum(b for _, b in STEPS)} s)")
    parser.add_argument("--steps", type=lambda v: v.split(","), default=None,
                        help="comma-separated subset of " + ",".join(s for s, _ in STEPS))
    parser.add_argument("--groups", type=lambda v: v.split(","), default=None,
                        help="comma-separated name prefixes of the speed (and cuda) groups to "
                             "run, e.g. 'matrix,calibration'")
    parser.add_argument("--resume", action="store_true",
                        help="append to NAME.first.jsonl, skipping cases and groups it holds")
    parser.add_argument("--step", choices=[s for s, _ in STEPS], help=argparse.SUPPRESS)
    parser.add_argument("--deadline", type=float, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    unknown = set(args.steps or ()) - {s for s, _ in STEPS}
    if unknown:
        parser.error(f"--steps: unknown {sorted(unknown)}; expected some of "
                     + ",".join(s for s, _ in STEPS))
    dry = args.dry_run or os.environ.get("GPU_SESSION_DRY_RUN", "0") not in ("", "0")
    if not dry:
        import torch
        if not torch.cuda.is_available():
            print("first: no CUDA GPU here; use --dry-run", file=sys.stderr)
            return 2
    if args.step:
        return run_step(args.step, args.name, args.results, dry, args.deadline, args.groups)
    return run(args.name, args.results, dry, args.budget_s, args.steps, args.resume, args.groups)


if __name__ == "__main__":
    sys.exit(main())
