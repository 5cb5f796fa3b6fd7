"""Verified first use: the first call of each kernel key on a GPU backend is checked against the
reference backend on the same inputs, under the tests' tolerance rule (``tolerance``).

``ops.run_forward`` / ``ops.run_backward`` call ``forward`` / ``backward`` here with the backend
module dispatch chose; the backends (and their kernels) know nothing of this module. A key is
(backend, direction, device, dtypes of x, weight and adapters, M rounded up to a power of two,
N, K, r, bias / dropout / latent presence, the need_* flags, the requested Triton GEMM variant).

On its first call the kernel runs, then its outputs are compared with a float64 reference and
PyTorch's low-precision run of the same formulas (the reference backend's, with the low-rank
operands in the dtype the kernels multiply in), on bounded memory:

- outputs with M rows (y, P, dx): a sample of at most ``SAMPLE_ROWS`` rows (first, last and
  rows spread in between), both references computed for those rows only;
- reductions over M (dA, dB, dR, dbias): in chunks of rows, accumulated in float64 (the
  low-precision term: each chunk in the low dtypes, summed in float64, rounded once at the end);
- no temporary bigger than ``_budget`` (the call's own outputs' bytes, at least
  ``MIN_BUDGET_BYTES``): the weight is read in float64 a slab of rows at a time.

Within the rule, the kernel's outputs are returned unchanged and the key is never checked again.
A mismatch, or an exception from the kernel, sends the key to the reference backend for the rest
of the process (cuBLAS: correct on any GPU; its backward keeps the same saved-tensor contract),
with one ``KernelVerificationWarning`` naming the kernel (backend and direction), the shape, the
config (the Triton autotuner's chosen configs and the GEMM variant, or "n/a") and the error; the
call itself returns the reference's outputs. A reference that is not finite (NaN/Inf inputs)
decides nothing: the key stays unchecked until a call with finite values.

``LOWRANK_FUSED_VERIFY``: "auto" (default: on for CUDA tensors on the triton and cuda
backends), "on" (also for CPU tensors, i.e. the Triton interpreter: how the tests exercise it),
"off". The check is skipped under torch.compile tracing (fake tensors) and during CUDA graph
capture (it would synchronise); a key already sent to the reference stays there in both.
"""
from __future__ import annotations

import os
import threading
import warnings
from typing import Optional

import torch
from torch import Tensor

from . import quantized
from .backends import pytorch as reference
from .dropout import keep_mask
from .errors import BackendUnavailableError
from .tolerance import kernel_mismatch

try:
    from torch._subclasses.fake_tensor import is_fake as _is_fake
except ImportError:  # pragma: no cover - older torch
    def _is_fake(t) -> bool:
        return False

ENV = "LOWRANK_FUSED_VERIFY"
MODES = ("auto", "on", "off")
CHECKED_BACKENDS = ("triton", "cuda")
SAMPLE_ROWS = 16  # rows of y, P and dx compared per check
MIN_BUDGET_BYTES = 16 << 20  # the check's temporaries may always use this much


class KernelVerificationWarning(RuntimeWarning):
    """A kernel failed its first-use check; its key now runs on the reference backend."""


_lock = threading.Lock()
_verdicts: dict = {}  # key -> True (kernel checked, passed) | False (reference from now on)


_MODE_OF = {None: "auto", "": "auto", "auto": "auto", "on": "on", "off": "off"}


def mode() -> str:
    """The mode asked for by ``LOWRANK_FUSED_VERIFY`` ("auto" when unset or empty; read on
    every call, about a microsecond)."""
    raw = os.environ.get(ENV)
    value = _MODE_OF.get(raw)
    if value is None:
        value = raw.strip().lower() or "auto"
        if value not in MODES:
            raise ValueError(f"{ENV}={raw!r}: expected one of auto (default: check the first "
                             "call of each kernel key on CUDA tensors), on, off")
    return value


def verdicts() -> dict:
    """A copy of the verdicts so far: key -> True (kernel passed) / False (sent to reference)."""
    with _lock:
        return dict(_verdicts)


def reset() -> None:
    """Forget every verdict: each key is checked again on its next call."""
    with _lock:
        _verdicts.clear()


# ---- entry points (called by ops.run_forward / ops.run_backward) ----

def forward(impl, x, weight, bias, lora_a, lora_b_eff, scaling, dropout, *, has_latent=False):
    """``impl.forward(...)`` (the backend contract), verified on the first call of its key."""
    args = (x, weight, bias, lora_a, lora_b_eff, scaling, dropout)
    key = _key_if_checked(impl, x, "forward", weight, lora_a,
                          (bias is not None, dropout is not None, has_latent))
    if key is None:
        return impl.forward(*args)
    verdict = _verdicts.get(key)
    if verdict is True:
        return impl.forward(*args)
    if verdict is False:
        return reference.forward(*args)
    if x.shape[0] == 0 or _capturing(x):
        return impl.forward(*args)
    return _first_use(key, impl.forward, reference.forward, args, {}, _forward_mismatch,
                      lambda: _describe(key, x.shape[0]))


def backward(impl, grad_y, x, p, weight, lora_a, lora_b, scaling, dropout, *, latent=None,
             need_x, need_a, need_b, need_latent=False, need_bias):
    """``impl.backward(...)`` (the backend contract), verified on the first call of its key."""
    args = (grad_y, x, p, weight, lora_a, lora_b, scaling, dropout)
    kwargs = dict(latent=latent, need_x=need_x, need_a=need_a, need_b=need_b,
                  need_latent=need_latent, need_bias=need_bias)
    key = _key_if_checked(impl, grad_y, "backward", weight, lora_a,
                          (need_bias, dropout is not None, latent is not None, need_x, need_a,
                           need_b, need_latent and latent is not None))
    if key is None:
        return impl.backward(*args, **kwargs)
    verdict = _verdicts.get(key)
    if verdict is True:
        return impl.backward(*args, **kwargs)
    if verdict is False:
        return reference.backward(*args, **kwargs)
    if grad_y.shape[0] == 0 or _capturing(grad_y):
        return impl.backward(*args, **kwargs)
    return _first_use(key, impl.backward, reference.backward, args, kwargs, _backward_mismatch,
                      lambda: _describe(key, grad_y.shape[0]))


# ---- keys and the first call ----

def _backend_name(impl) -> str:
    return impl.__name__.rpartition(".")[2]


def _key_if_checked(impl, rows: Tensor, direction, weight, lora_a, flags) -> Optional[tuple]:
    """The call's key, or None when this call is not subject to the check at all."""
    verify = mode()  # first: a bad value is an error on every backend
    backend = _backend_name(impl)
    if (verify == "off" or backend not in CHECKED_BACKENDS
            or (verify == "auto" and rows.device.type != "cuda")):
        return None
    if torch.compiler.is_compiling() or _is_fake(rows) or rows.device.type == "meta":
        return None
    m = rows.shape[0]
    n, k = quantized.shape(weight)  # a 4-bit weight's (N, K), not its packed bytes' shape
    return (backend, direction, rows.device, rows.dtype, weight.dtype, lora_a.dtype,
            _bucket(m), n, k, lora_a.shape[0], flags,
            _requested_gemm_variant(backend))


def _bucket(m: int) -> int:
    return 1 << (m - 1).bit_length() if m > 0 else 0


def _requested_gemm_variant(backend: str) -> Optional[str]:
    if backend != "triton":
        return None
    from .triton_kernels import variants  # loaded already: the triton backend imports it
    return os.environ.get(variants.ENV) or "auto"


def _capturing(t: Tensor) -> bool:
    return t.device.type == "cuda" and torch.cuda.is_current_stream_capturing()


_INCONCLUSIVE = "inconclusive"


def _first_use(key, run_kernel, run_reference, args, kwargs, find_mismatch, describe):
    """Run the kernel, check it, record the verdict; the kernel's outputs if they pass, else the
    reference's (after one warning)."""
    try:
        outputs = run_kernel(*args, **kwargs)
    except (torch.cuda.OutOfMemoryError, TypeError, BackendUnavailableError):
        # not the kernel's fault: no memory (the reference would not fit either), or arguments
        # the backend refuses (its message says what to change), which the user must see
        raise
    except Exception as err:  # noqa: BLE001 - any failure of the kernel sends it to reference
        error = f"raised {type(err).__name__}: {err}"
    else:
        try:
            with torch.no_grad():
                error = find_mismatch(outputs, *args, **kwargs)
        except torch.cuda.OutOfMemoryError:
            error = _INCONCLUSIVE  # no room for the check now: try again on a later call
        if error is None:
            with _lock:
                _verdicts.setdefault(key, True)
            return outputs
        if error is _INCONCLUSIVE:
            return outputs
        del outputs  # free the kernel's outputs before the reference makes its own
    with _lock:
        first = _verdicts.get(key) is not False
        _verdicts[key] = False
    if first:
        backend, direction = key[0], key[1]
        shape, config = describe()
        warnings.warn(
            f"lowrank_fused: kernel {backend} {direction} failed its first-use check on {shape} "
            f"(config: {config}): {error}. This key now runs on the reference backend (cuBLAS: "
            f"correct on any GPU, same saved tensors); set {ENV}=off to skip the check.",
            KernelVerificationWarning, stacklevel=4)
    return run_reference(*args, **kwargs)


def _describe(key, m: int) -> tuple[str, str]:
    """(shape, config) of a key, for the warning."""
    (backend, direction, device, x_dtype, w_dtype, a_dtype, bucket, n, k, r, flags,
     variant) = key
    name = lambda dt: str(dt).replace("torch.", "")  # noqa: E731
    if direction == "forward":
        flag_names = ("bias", "dropout", "latent")
    else:
        flag_names = ("bias grad", "dropout", "latent", "need_x", "need_a", "need_b",
                      "need_latent")
    present = [f for f, on in zip(flag_names, flags) if on]
    shape = (f"M={m} (bucket {bucket}), N={n}, K={k}, r={r} on {device}, x {name(x_dtype)}, "
             f"weight {name(w_dtype)}, adapters {name(a_dtype)}"
             + (f", {', '.join(present)}" if present else ""))
    return shape, _config_text(backend, direction, device, (bucket, n, k, r), variant)


def _config_text(backend, direction, device, shape, variant) -> str:
    """The Triton autotuners' chosen configs for this direction's kernels (their last launch:
    this call's) and the GEMM variant; "n/a" for other backends."""
    if backend != "triton":
        return "n/a"
    try:
        from .triton_kernels import configs, variants
        parts = [f"GEMM variant {variant}"]
        gemm = "grad_input" if direction == "backward" else "fused_linear"
        for (name, index, shape_key), chosen in list(variants._winners.items()):
            if name == gemm and index == device.index and tuple(shape_key[:4]) == shape:
                parts.append(f"{name} timed winner {chosen}")
        tuned = []
        for tuner in list(configs._tuned.values()):
            kernel = getattr(getattr(tuner, "base_fn", None), "__name__", "?")
            best = getattr(tuner, "best_config", None)
            if best is not None and kernel.startswith("_grad") == (direction == "backward"):
                tuned.append(f"{kernel}: {best}")
        parts.extend(tuned or ["n/a (no autotuned config: interpreter's fixed configs)"])
        return "; ".join(parts)
    except Exception as err:  # noqa: BLE001 - the description must not hide the failure
        return f"n/a ({type(err).__name__}: {err})"


# ---- the comparison ----

def _low_rank_dtype(base: torch.dtype, adapters: torch.dtype) -> torch.dtype:
    """The dtype the kernels multiply the low-rank operands in (fp32 accumulation): the base's
    over a 16-bit base, else the adapters'; PyTorch's low-precision run uses it too."""
    return base if base in (torch.float16, torch.bfloat16) else adapters


def _lowest(*dtypes) -> torch.dtype:
    return max(dtypes, key=lambda dt: torch.finfo(dt).eps)


def _budget(*tensors) -> int:
    """Bytes the check's temporaries may use: the call's own outputs' (at least 16 MiB)."""
    used = sum(t.numel() * t.element_size() for t in tensors if t is not None)
    return max(used, MIN_BUDGET_BYTES)


def _sample_rows(m: int, device) -> Tensor:
    count = min(m, SAMPLE_ROWS)
    rows = sorted({round(i * (m - 1) / max(count - 1, 1)) for i in range(count)})
    return torch.tensor(rows, dtype=torch.int64, device=device)


def _keep(dropout, rows: Tensor, cols: int) -> Optional[Tensor]:
    """The reference's keep-mask for global ``rows`` and all ``cols`` columns (None: no dropout)."""
    if dropout is None:
        return None
    return keep_mask(dropout.seed, dropout.p, rows,
                     torch.arange(cols, dtype=torch.int64, device=rows.device))


def _drop(t: Tensor, keep: Optional[Tensor], dropout) -> Tensor:
    """The reference's dropout (a multiply, in t's dtype) with a precomputed mask."""
    return t if keep is None else t * keep * dropout.keep_scale


def _times_weight_t(rows64: Tensor, weight: Tensor, budget: int) -> Tensor:
    """rows64 · Wᵀ in float64 (S x N), W read a slab of rows at a time."""
    n, k = weight.shape
    step = max(1, budget // (16 * k))
    out = rows64.new_empty((rows64.shape[0], n))
    for n0 in range(0, n, step):
        out[:, n0:n0 + step] = rows64 @ weight[n0:n0 + step].double().T
    return out


def _times_weight(rows64: Tensor, weight: Tensor, budget: int) -> Tensor:
    """rows64 · W in float64 (S x K), W read a slab of rows at a time."""
    n, k = weight.shape
    step = max(1, budget // (16 * k))
    out = rows64.new_zeros((rows64.shape[0], k))
    for n0 in range(0, n, step):
        out += rows64[:, n0:n0 + step] @ weight[n0:n0 + step].double()
    return out


def _judge(checks, dtype) -> Optional[str]:
    """None if every (name, got, want64, torch_low) is within the rule; _INCONCLUSIVE if a
    reference is not finite; else the mismatches."""
    for _, got, want64, low in checks:
        if not (bool(torch.isfinite(want64).all()) and bool(torch.isfinite(low).all())):
            return _INCONCLUSIVE
    found = []
    for name, got, want64, low in checks:
        if got is None or got.shape != want64.shape:
            found.append(f"{name}: shape {None if got is None else tuple(got.shape)}, expected "
                         f"{tuple(want64.shape)}")
            continue
        message = kernel_mismatch(got, want64, low, name, dtype)
        if message is not None:
            found.append(message)
    return "; ".join(found) or None


def _forward_mismatch(outputs, x, weight, bias, lora_a, lora_b_eff, scaling, dropout):
    """The forward's (y, P) on sampled rows against both references; None when within the rule."""
    y, p = outputs
    m, k = x.shape
    # a 4-bit W: bitsandbytes' dequantized values in x's dtype (what the kernels multiply by)
    weight = quantized.dense_like(weight, x.dtype)
    low = _low_rank_dtype(x.dtype, lora_a.dtype)
    budget = _budget(y, p)
    rows = _sample_rows(m, x.device)
    xs = x.index_select(0, rows)
    keep = _keep(dropout, rows, k)

    p64 = _drop(xs.double(), keep, dropout) @ lora_a.double().T
    y64 = _times_weight_t(xs.double(), weight, budget) + scaling * (p64 @ lora_b_eff.double().T)
    if bias is not None:
        y64 += bias.double()
    # PyTorch's low-precision run: the reference backend's formulas, low-rank operands in `low`.
    p_low = _drop(xs, keep, dropout).to(low) @ lora_a.to(low).T
    y_low = (torch.nn.functional.linear(xs, weight, bias)
             + (scaling * (p_low @ lora_b_eff.to(low).T)).to(x.dtype))
    got_y = y.index_select(0, rows) if y.shape[0] == m else y
    got_p = p.index_select(0, rows) if p.shape[0] == m else p
    return _judge([("y", got_y, y64, y_low), ("P", got_p, p64, p_low)],
                  _lowest(x.dtype, lora_a.dtype))


def _backward_mismatch(outputs, grad_y, x, p, weight, lora_a, lora_b, scaling, dropout, *,
                       latent=None, need_x, need_a, need_b, need_latent=False, need_bias):
    """The backward's gradients against both references (dx on sampled rows, the reductions over
    M in chunks of rows); None when within the rule."""
    dx, da, db, dr, dbias = outputs
    need_latent = need_latent and latent is not None
    m, n = grad_y.shape
    weight = quantized.dense_like(weight, grad_y.dtype)  # 4-bit: dequantized, as the forward
    k, r = weight.shape[1], lora_a.shape[0]
    base = grad_y.dtype
    low = _low_rank_dtype(base, lora_a.dtype)
    budget = _budget(dx, da, db, dr, dbias) + m * r * 4  # + dP (M x r fp32), the call's own
    s = scaling
    a64, a_low = lora_a.double(), lora_a.to(low)
    b64, b_low = lora_b.double(), lora_b.to(low)
    r64 = None if latent is None else latent.double()
    r_low = None if latent is None else latent.to(low)

    def dp_of(t, latent_):  # dP from T = s·G·B (reference.latent_gradients)
        return t if latent_ is None else t @ latent_.T

    checks = []
    if need_a or need_b or need_latent or need_bias:
        acc64 = {}
        acc_low = {}

        def add(name, v64, v_low):
            acc64[name] = acc64[name] + v64 if name in acc64 else v64
            v_low = v_low.double()
            acc_low[name] = acc_low[name] + v_low if name in acc_low else v_low

        per_row = 16 * (n + k) + 8 * (n + 2 * r) + (48 * k if dropout is not None else 0)
        step = max(1, budget // per_row)
        for m0 in range(0, m, step):
            g = grad_y[m0:m0 + step]
            g64, g_low = g.double(), g.to(low)
            if need_a or need_latent:
                t64, t_low = s * (g64 @ b64), s * (g_low @ b_low)
                if need_a:
                    rows = torch.arange(m0, m0 + g.shape[0], dtype=torch.int64, device=g.device)
                    keep = _keep(dropout, rows, k)
                    xc = x[m0:m0 + step]
                    add("dA", dp_of(t64, r64).T @ _drop(xc.double(), keep, dropout),
                        dp_of(t_low, r_low).T @ _drop(xc, keep, dropout).to(low))
                if need_latent:
                    pc = p[m0:m0 + step]
                    add("dR", pc.double().T @ t64, pc.to(low).T @ t_low)
            if need_b:
                pc = p[m0:m0 + step]
                pr64 = pc.double() if r64 is None else pc.double() @ r64
                pr_low = pc.to(low) if r_low is None else pc.to(low) @ r_low
                add("dB", s * (g64.T @ pr64), s * (g_low.T @ pr_low))
            if need_bias:
                add("dbias", g64.sum(0), g.sum(0))
        got = {"dA": da, "dB": db, "dR": dr, "dbias": dbias}
        for name in acc64:
            # PyTorch's single full reduction rounds once, to its result's dtype.
            checks.append((name, got[name], acc64[name],
                           acc_low[name].to(base if name == "dbias" else low)))
    if need_x:
        rows = _sample_rows(m, grad_y.device)
        gs = grad_y.index_select(0, rows)
        keep = _keep(dropout, rows, k)
        gs64 = gs.double()
        dx64 = (_times_weight(gs64, weight, budget)
                + _drop(dp_of(s * (gs64 @ b64), r64) @ a64, keep, dropout))
        dps_low = dp_of(s * (gs.to(low) @ b_low), r_low)
        dx_low = (gs @ weight + _drop(dps_low @ a_low, keep, dropout).to(base)).to(weight.dtype)
        got_dx = dx.index_select(0, rows) if dx is not None and dx.shape[0] == m else dx
        checks.append(("dx", got_dx, dx64, dx_low))
    return _judge(checks, _lowest(base, lora_a.dtype))
