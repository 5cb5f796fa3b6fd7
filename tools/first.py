"""The first GPU run: what decides the design, in at most seven minutes from a cold Triton cache.

    python -m tools.first NAME [--results DIR] [--budget-s 400] [--dry-run]
    bash tools/gpu_session.sh first NAME        (the same, from the device tool)

It runs from the tree as copied, installs nothing, and writes every figure as one JSON line,
flushed at once, to RESULTS/NAME.first.jsonl and, when $OUT is set, to $OUT/NAME.first.jsonl:
a run killed at any point keeps what it measured. Each step runs in its own process under its
own time budget (``STEPS``; their sum is the run's budget); a step out of time is killed and
recorded as such, and a step's groups not started within its budget are recorded as skipped.

1. env: GPU, driver, torch and its CUDA, triton, gcc and Python.h (Triton builds a C launcher
   per kernel), nvcc and its version.
2. correctness: the Triton backend against the float64 reference at one LLaMA shape (M = 4096,
   K = N = 4096, r = 16) under the tests' tolerance rule (tests/tolerance.py), forward and every
   gradient: bf16 base with fp32 and bf16 adapters, dropout off and on, LoRA / LoRA-FA / LoRA-XS,
   tiled and TMA GEMMs forced in turn; a bitsandbytes 4-bit W (NF4 nested, FP4; the 4-bit
   GEMMs, against float64 over bitsandbytes' dequantized W; skipped without bitsandbytes); an
   fp32 base with TF32 off and on; DoRA (A trainable and frozen, dropout off and on, bf16 base;
   fp32 base with TF32); the same call twice (kept accumulators); the keep-mask bit for bit
   against the reference at an odd shape.
   Autotuning is ``quick`` here (one fitting config per kernel, no timing).
3. speed: tools.probe's figures (Triton GEMMs vs cuBLAS, both variants; fwd and fwd+bwd of
   each method against a bare frozen nn.Linear and PEFT at the compass shapes; QLoRA: the 4-bit
   layer against the same layer over the dequantized bf16 W; DoRA's Triton backend against
   bare, PEFT's use_dora and the reference backend), most decisive first, each next to
   tools.model's prediction, with the cold first call of each.
4. cuda: the CUDA extension, built in the background from the start for this GPU's arch alone
   (skipped with the reason where nvcc is missing or its CUDA major differs from torch's), then
   its correctness cases and tests/test_csrc.py's GPU tests with the time left.

Dry run (no GPU; CI): the same steps on tiny CPU shapes (Triton on the interpreter), nothing
timed, the build skipped with its reason; exits non-zero if any step fails or runs out of time.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import time
import warnings

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# (step, seconds): the run's budget is their sum, 400 s, inside the 7 minutes the issue allows
# (Python and CUDA start-up of each step process is counted inside its step).
STEPS = (("env", 20), ("correctness", 140), ("speed", 200), ("cuda", 40))
TOTAL_BUDGET_S = 420.0  # what a lent machine's first command may take, start-up aside
LLAMA = (4096, 4096, 4096, 16)  # M, K, N, r of the correctness step
DRY = (37, 80, 48, 16)  # odd M, K not a multiple of the block: the CPU stand-in
DROPOUT_P = 0.1


class Sink:
    """Appends JSON lines to each path, flushed and closed per line (a kill loses nothing)."""

    def __init__(self, paths):
        self.paths = list(paths)

    def __call__(self, **row):
        line = json.dumps(row, ensure_ascii=False, default=str) + "\n"
        for path in self.paths:
            with open(path, "a") as f:
                f.write(line)
        shown = {k: v for k, v in row.items() if k != "step"}
        print(f"[{row.get('step', '-')}] {json.dumps(shown, default=str)[:240]}", flush=True)

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


def _run(cmd, timeout=30) -> str:
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        return (done.stdout or done.stderr).strip().splitlines()[0] if (
            done.stdout or done.stderr) else f"rc {done.returncode}"
    except (OSError, subprocess.TimeoutExpired) as err:
        return f"unavailable ({type(err).__name__})"


# ---------------------------------------------------------------------------------- step 1


def step_env(sink, dry: bool, deadline: float) -> None:
    import torch
    import triton

    row = dict(python=sys.version.split()[0], torch=torch.__version__,
               torch_cuda=torch.version.cuda, triton=triton.__version__,
               gcc=_run(["gcc", "--version"]),
               python_h=os.path.isfile(os.path.join(sysconfig.get_paths()["include"],
                                                    "Python.h")),
               nvcc=shutil.which("nvcc"), nvcc_release=nvcc_release())
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        row.update(gpu=props.name, capability=list(torch.cuda.get_device_capability(0)),
                   sms=props.multi_processor_count, memory_gib=round(props.total_memory / 2**30, 1),
                   driver=_run(["nvidia-smi", "--query-gpu=driver_version",
                                "--format=csv,noheader"]))
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


def correctness_cases(dry: bool):
    """(label, settings) in order of what they decide: the default setup first."""
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
    # what BitsAndBytesConfig's double quantization loads; FP4 plain)
    # (a dry run, on the interpreter, keeps the one with the most code in it: nested absmax,
    # dx with dropout, dA; its correctness step has little time to spare on a shared CPU)
    four_bit = [dict(method=method, dropout=dropout, adapter=fp32, quant="nf4", nested=True)
                for method in ("lora_fa", "lora", "lora_xs") for dropout in (False, True)]
    four_bit.append(dict(method="lora", dropout=True, adapter=bf16, quant="fp4", nested=False))
    for c in four_bit[3:4] if dry else four_bit:
        cases.append(dict(base=bf16, variant="tiled", tf32=False, **c))
    for tf32 in (False, True):
        for dropout in (False, True):
            cases.append(dict(base=fp32, adapter=fp32, method="lora", dropout=dropout,
                              variant="tiled", tf32=tf32))
    # DoRA (triton_kernels/dora.py; tiled GEMMs only), last: new kernels, so the plain cases
    # keep their place in the step's budget
    for dropout in (False, True):
        for method in ("dora", "dora_fa"):
            cases.append(dict(base=bf16, adapter=fp32, method=method, dropout=dropout,
                              variant="tiled", tf32=False))
    cases.append(dict(base=fp32, adapter=fp32, method="dora", dropout=True, variant="tiled",
                      tf32=True))
    return [(_label(c), c) for c in cases]


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
    import torch
    m, k, n, r = shape
    g = torch.Generator().manual_seed(seed)

    def t(*size, dtype, scale=1.0):
        return (torch.randn(*size, generator=g, dtype=torch.float32) * scale).to(
            device=device, dtype=dtype)

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
                        bias=leaves["bias"], latent=leaves["latent"], scaling=2.0,
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


def step_correctness(sink, dry: bool, deadline: float, backend="triton", cases=None) -> int:
    """Runs the cases; returns how many failed."""
    import torch
    os.environ["LOWRANK_FUSED_AUTOTUNE"] = "quick"  # correctness: one config, no timing
    os.environ["LOWRANK_FUSED_VERIFY"] = "off"  # the kernels themselves, never the fallback
    device = torch.device("cpu" if dry else "cuda")
    shape = DRY if dry else LLAMA
    step = "correctness" if backend == "triton" else "cuda"
    failed = 0
    if backend == "triton":
        failed += not _timed(sink, step, "keep-mask vs reference, 37 x 1000", deadline,
                             lambda: check_keep_mask(device))
    import importlib.util
    have_bnb = importlib.util.find_spec("bitsandbytes") is not None
    for i, (label, c) in enumerate(cases or correctness_cases(dry)):
        if c.get("quant") and not have_bnb:
            sink(step=step, name=f"{backend} {label} M,K,N,r={shape}",
                 skipped="bitsandbytes is not installed")
            continue
        os.environ["LOWRANK_FUSED_TRITON_GEMM"] = c["variant"]
        failed += not _timed(sink, step, f"{backend} {label} M,K,N,r={shape}", deadline,
                             lambda: check_case(c, shape, device, 100 + i, backend))
    os.environ.pop("LOWRANK_FUSED_TRITON_GEMM", None)
    return failed


def _timed(sink, step, name, deadline, fn) -> bool:
    """Runs fn() if the step's time allows; records its result, error or skip. False when it
    ran and failed."""
    if time.time() > deadline:
        sink(step=step, name=name, skipped="out of time")
        return True
    start = time.time()
    try:
        result = fn()
    except Exception as exc:  # noqa: BLE001  (one broken case must not waste the run)
        result = dict(ok=False, error=f"{type(exc).__name__}: {exc}"[:400])
    sink(step=step, name=name, seconds=round(time.time() - start, 2), **result)
    return result["ok"]


# ---------------------------------------------------------------------------------- step 3


def step_speed(sink, dry: bool, deadline: float) -> None:
    import torch
    from tools import model, probe
    os.environ.pop("LOWRANK_FUSED_AUTOTUNE", None)  # speed: the real autotuner
    device = torch.device("cpu" if dry else "cuda")
    p = probe.Probe(device, model.Hardware(), model.Code(),
                    sink=lambda row: sink(step="speed", **row))
    done = _groups_done(sink.paths[0])
    groups = probe.first_groups(p, dry)
    for name, group in groups:
        if name in done:  # --resume: measured by an earlier run into the same file
            continue
        if time.time() > deadline:
            sink(step="speed", name=name, skipped="out of time")
            continue
        start = time.time()
        # verified first use stays on, as users run it: a key it sends to the reference path
        # warns, and its times are then not the kernels'
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                group()
            except Exception as exc:  # noqa: BLE001
                sink(step="speed", name=name, error=f"{type(exc).__name__}: {exc}"[:400])
                if dry:
                    raise
        sink(step="speed", name=name, group_seconds=round(time.time() - start, 1),
             warnings=sorted({str(w.message)[:300] for w in caught})[:5])


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


def step_cuda(sink, dry: bool, deadline: float, build_log: str) -> None:
    """After the background build: the CUDA backend's correctness cases, then its GPU tests."""
    import torch
    from lowrank_fused import available_backends
    if "cuda" not in available_backends():
        sink(step="cuda", name="extension", skipped="lowrank_fused._C did not load",
             log=build_log)
        return
    # DoRA's "cuda" calls run on Triton (dispatch.select), and so do 4-bit calls asked of
    # "cuda" (Triton's 4-bit kernels): the correctness step has both
    cases = [(label, c) for label, c in correctness_cases(dry)
             if c["variant"] == "tiled" and not c["method"].startswith("dora")
             and not c.get("quant")]
    step_correctness(sink, dry, deadline - 20, backend="cuda", cases=cases[:12] + cases[-4:])
    left = deadline - time.time()
    if left < 10:
        sink(step="cuda", name="tests/test_csrc.py", skipped="out of time")
        return
    cmd = [sys.executable, "-m", "pytest", "tests/test_csrc.py", "-q", "-x", "-p",
           "no:cacheprovider", "-k", "cuda_backend_matches_reference"]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=left, cwd=ROOT)
        tail = (done.stdout + done.stderr).strip().splitlines()[-3:]
        sink(step="cuda", name="tests/test_csrc.py GPU cases", rc=done.returncode, tail=tail)
    except subprocess.TimeoutExpired:
        sink(step="cuda", name="tests/test_csrc.py GPU cases", skipped="out of time (killed)")


# ---------------------------------------------------------------------------------- driver


def run_step(step: str, name: str, results: str, dry: bool, deadline: float) -> int:
    if dry:
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before the kernels are imported
    sys.path.insert(0, ROOT)
    sink = Sink(_sink_paths(results, name))
    if step == "env":
        step_env(sink, dry, deadline)
    elif step == "correctness":
        failed = step_correctness(sink, dry, deadline)
        if dry and failed:  # on the CPU a failure is a bug to fix before any GPU run
            return 1
    elif step == "speed":
        step_speed(sink, dry, deadline)
    elif step == "cuda":
        step_cuda(sink, dry, deadline, os.path.join(results, f"{name}.cuda_build.log"))
    return 0


def run(name: str, results: str, dry: bool, budget_s: float = None, steps=None,
        resume: bool = False) -> int:
    """The steps (default all), each in its own process under its budget; 0 when every step
    finished. ``resume``: append to the file and skip the speed groups it already holds (a
    second command on a warm machine continues the first)."""
    os.makedirs(results, exist_ok=True)
    if os.environ.get("OUT"):
        os.makedirs(os.environ["OUT"], exist_ok=True)
    sink = Sink(_sink_paths(results, name))
    if not resume:
        for path in sink.paths:  # a fresh file per run
            open(path, "w").close()
    budgets = {s: b for s, b in STEPS if steps is None or s in steps}
    if budget_s is not None:  # env keeps its own (start-up) up to a quarter; the rest share
        env = min(budgets.get("env", 0), budget_s / 4)
        scale = (budget_s - env) / (sum(budgets.values()) - budgets.get("env", 0))
        budgets = {s: env if s == "env" else b * scale for s, b in budgets.items()}
    start = time.time()
    sink(step="plan", kind="plan", steps={s: round(b, 1) for s, b in budgets.items()},
         budget_s=round(sum(budgets.values()), 1), limit_s=TOTAL_BUDGET_S, dry_run=dry,
         fits=sum(budgets.values()) <= TOTAL_BUDGET_S)
    build, failed = None, []
    build_log = os.path.join(results, f"{name}.cuda_build.log")
    for step, budget in budgets.items():
        if step == "correctness":  # the build runs beside steps 2 and 3
            build = _start_build(sink, dry, build_log)
        if step == "cuda" and build is not None:
            _finish_build(sink, build, build_log, start + sum(budgets.values()) - 25)
            if os.environ.get("OUT"):
                shutil.copy(build_log, os.path.join(os.environ["OUT"], os.path.basename(build_log)))
        deadline = time.time() + budget
        cmd = [sys.executable, "-m", "tools.first", name, "--results", results,
               "--step", step, "--deadline", str(deadline - 3)] + (["--dry-run"] if dry else [])
        step_start = time.time()
        try:
            rc = subprocess.run(cmd, cwd=ROOT, timeout=max(budget, 1)).returncode
            status = "done" if rc == 0 else f"failed (rc {rc})"
        except subprocess.TimeoutExpired:
            status = "out of time (killed)"
        if status != "done":
            failed.append(step)
        sink.sync()
        sink(step=step, kind="step", status=status, seconds=round(time.time() - step_start, 1),
             budget_s=round(budget, 1))
    if build is not None and build.poll() is None:
        build.kill()
    wall = time.time() - start
    sink(step="summary", kind="summary", wall_s=round(wall, 1), limit_s=TOTAL_BUDGET_S,
         within_limit=wall <= TOTAL_BUDGET_S, failed_steps=failed, **_tally(sink.paths[0]))
    return 1 if failed or wall > TOTAL_BUDGET_S else 0


def _groups_done(path) -> set:
    """Names of the speed groups that finished in the file so far."""
    if not os.path.exists(path):
        return set()
    with open(path) as f:
        rows = [json.loads(line) for line in f]
    return {r["name"] for r in rows if "group_seconds" in r and "error" not in r}


def _tally(path) -> dict:
    """Checks passed, failed and skipped, from the lines written so far."""
    counts = {"checks_passed": 0, "checks_failed": 0, "skipped": 0}
    with open(path) as f:
        for line in f:
            row = json.loads(line)
            if "skipped" in row:
                counts["skipped"] += 1
            elif "ok" in row:
                counts["checks_passed" if row["ok"] else "checks_failed"] += 1
    return counts


def _start_build(sink, dry, log_path):
    import torch  # noqa: F401  (build_plan needs it; the parent imports it only here)
    cmd, env = build_plan(dry)
    if cmd is None:
        sink(step="cuda", name="build", skipped=env)
        return None
    sink(step="cuda", name="build", started=" ".join(cmd[1:]), archs=env["LOWRANK_FUSED_CUDA_ARCHS"])
    log = open(log_path, "w")
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
    parser.add_argument("--dry-run", action="store_true", help="CPU, tiny shapes, nothing timed")
    parser.add_argument("--budget-s", type=float, default=None,
                        help=f"scale the steps' budgets to this total (default "
                             f"{sum(b for _, b in STEPS)} s)")
    parser.add_argument("--steps", type=lambda v: v.split(","), default=None,
                        help="comma-separated subset of " + ",".join(s for s, _ in STEPS))
    parser.add_argument("--resume", action="store_true",
                        help="append to NAME.first.jsonl, skipping speed groups it holds")
    parser.add_argument("--step", choices=[s for s, _ in STEPS], help=argparse.SUPPRESS)
    parser.add_argument("--deadline", type=float, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    dry = args.dry_run or os.environ.get("GPU_SESSION_DRY_RUN", "0") not in ("", "0")
    if not dry:
        import torch
        if not torch.cuda.is_available():
            print("first: no CUDA GPU here; use --dry-run", file=sys.stderr)
            return 2
    if args.step:
        return run_step(args.step, args.name, args.results, dry, args.deadline)
    return run(args.name, args.results, dry, args.budget_s, args.steps, args.resume)


if __name__ == "__main__":
    sys.exit(main())
