"""Verified first use: the first call of each kernel key on a GPU backend is checked against the
PyTorch backend on the same inputs, under the tests' tolerance rule (``tolerance``).

``ops.run_forward`` / ``ops.run_backward`` call ``forward`` / ``backward`` (a plain call) or
``dora_forward`` / ``dora_backward`` (a DoRA call) here with the backend module
``dispatch.select`` chose; the backends (and their kernels) know nothing of this module. A key is
(backend, direction, device, dtypes of x and the adapters, the weight's format (its dtype, or a
4-bit weight's quant type, blocksize, nesting and dtype), M rounded up to a power of two, N, K, r,
bias / dropout / latent presence, the need_* flags, and what else decides the kernel code, as the
backend's ``config_key()`` says (the requested Triton GEMM variant)).

On its first call the kernel runs, then its outputs are compared with a float64 reference and
PyTorch's low-precision run of the same formulas (the PyTorch backend's, with the low-rank
operands in the dtype the kernels multiply in), on bounded memory:

- outputs with M rows (y, P, Z, dx): a sample of at most ``SAMPLE_ROWS`` rows (first, last and
  rows spread in between), both references computed for those rows only;
- reductions over M (dA, dB, dR, dbias, dm): in chunks of rows, accumulated in float64 (the
  low-precision term: each chunk in the low dtypes, summed in float64, rounded once at the end);
- no temporary bigger than ``_budget`` (the call's own outputs' bytes, at least
  ``MIN_BUDGET_BYTES``): the weight is read in float64 a slab of rows at a time (a 4-bit weight
  is dequantized to x's dtype first: bitsandbytes' values, what the kernels multiply by).

DoRA's c (and the norm) are the operator's own (``dora.column_scale``): the check holds the
kernels to the formulas given c.

Within the rule, the kernel's outputs are returned unchanged and the key is never checked again.
A mismatch, or an exception from the kernel, sends the key to the PyTorch backend for the rest
of the process (cuBLAS: correct on any GPU; its backward keeps the same saved-tensor contract),
with one ``KernelVerificationWarning`` naming the kernel (backend and direction), the shape, the
config (the backend's ``describe_config``: the Triton autotuner's chosen configs and the GEMM
variant, or "n/a") and the error; the call itself returns the PyTorch backend's outputs. A
reference that is not finite (NaN/Inf inputs) decides nothing: the key stays unchecked until a
call with finite values.

``LOWRANK_FUSED_VERIFY``: "auto" (default: on for CUDA tensors on the triton and cuda
backends), "on" (also for CPU tensors, i.e. the Triton interpreter: how the tests exercise it),
"off". The check is skipped under torch.compile tracing (fake tensors) and during CUDA graph
capture (it would synchronise); a key already sent to the PyTorch backend stays there in both.
"""
from __future__ import annotations

import threading
import warnings
from typing import Optional

import torch
from torch import Tensor

from . import _env, quantized
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
SAMPLE_ROWS = 16  # rows of y, P, Z and dx compared per check
MIN_BUDGET_BYTES = 16 << 20  # the check's temporaries may always use this much


class KernelVerificationWarning(RuntimeWarning):
    """A kernel failed its first-use check; its key now runs on the PyTorch backend."""


_lock = threading.Lock()
_verdicts: dict = {}  # key -> True (kernel checked, passed) | False (reference from now on)


_MODE_OF = {None: "auto", "": "auto", "auto": "auto", "on": "on", "off": "off"}
_env_mode = _env.reader(ENV)


def mode() -> str:
    """The mode asked for by ``LOWRANK_FUSED_VERIFY`` ("auto" when unset or empty; read on
    every call)."""
    raw = _env_mode()
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
    verify = _checked_mode(impl)
    if verify is None:  # the common case, without building a key
        return impl.forward(x, weight, bias, lora_a, lora_b_eff, scaling, dropout)
    return _verified(verify, impl, "forward", x, weight, lora_a, lora_b_eff,
                     (bias is not None, dropout is not None, has_latent),
                     (x, weight, bias, lora_a, lora_b_eff, scaling, dropout), {},
                     _forward_mismatch)


def backward(impl, grad_y, x, p, weight, lora_a, lora_b, scaling, dropout, *, latent=None,
             need_x, need_a, need_b, need_latent=False, need_bias):
    """``impl.backward(...)`` (the backend contract), verified on the first call of its key."""
    verify = _checked_mode(impl)
    if verify is None:
        return impl.backward(grad_y, x, p, weight, lora_a, lora_b, scaling, dropout,
                             latent=latent, need_x=need_x, need_a=need_a, need_b=need_b,
                             need_latent=need_latent, need_bias=need_bias)
    return _verified(verify, impl, "backward", grad_y, weight, lora_a, lora_b,
                     (need_bias, dropout is not None, latent is not None, need_x, need_a,
                      need_b, need_latent and latent is not None),
                     (grad_y, x, p, weight, lora_a, lora_b, scaling, dropout),
                     dict(latent=latent, need_x=need_x, need_a=need_a, need_b=need_b,
                          need_latent=need_latent, need_bias=need_bias),
                     _backward_mismatch)


def dora_forward(impl, x, weight, bias, lora_a, lora_b_eff, scaling, dropout, c, *, need_z,
                 has_latent=False):
    """``impl.dora_forward(...)``, verified on the first call of its key."""
    return _verified(_checked_mode(impl), impl, "dora_forward", x, weight, lora_a, lora_b_eff,
                     (bias is not None, dropout is not None, has_latent, need_z),
                     (x, weight, bias, lora_a, lora_b_eff, scaling, dropout, c),
                     dict(need_z=need_z), _dora_forward_mismatch)


def dora_backward(impl, grad_y, x, p, z, weight, lora_a, lora_b, latent, scaling, dropout, c,
                  norm, *, need_x, need_a, need_b, need_latent, need_bias, need_m,
                  z_is_output=False):
    """``impl.dora_backward(...)``, verified on the first call of its key."""
    return _verified(_checked_mode(impl), impl, "dora_backward", grad_y, weight, lora_a, lora_b,
                     (need_bias, dropout is not None, latent is not None, need_x, need_a,
                      need_b, need_latent and latent is not None, need_m, z_is_output),
                     (grad_y, x, p, z, weight, lora_a, lora_b, latent, scaling, dropout, c,
                      norm),
                     dict(need_x=need_x, need_a=need_a, need_b=need_b, need_latent=need_latent,
                          need_bias=need_bias, need_m=need_m, z_is_output=z_is_output),
                     _dora_backward_mismatch)


# ---- keys and the first call ----

_DIRECTIONS = {"forward": "forward", "backward": "backward", "dora_forward": "DoRA forward",
               "dora_backward": "DoRA backward"}  # a backend function -> the warning's words


def _verified(verify, impl, function, rows, weight, lora_a, lora_b, flags, args, kwargs,
              find_mismatch):
    """The backend's ``function`` on (args, kwargs), checked on its key's first call (the
    PyTorch backend's for a key that failed): ``verify`` is the mode, None when unchecked."""
    run_kernel = getattr(impl, function)
    key = None if verify is None else _key_if_checked(
        verify, impl, rows, _DIRECTIONS[function], weight, lora_a, lora_b, flags)
    if key is None:
        return run_kernel(*args, **kwargs)
    return _run(key, impl, run_kernel, getattr(reference, function), args, kwargs,
                find_mismatch, rows)


def _checked_mode(impl) -> Optional[str]:
    """The mode, or None for a backend the check does not cover (the PyTorch backend itself) or
    with the check off. The mode is read first: a bad value is an error on every backend."""
    verify = mode()
    return None if verify == "off" or impl.NAME not in CHECKED_BACKENDS else verify


def _key_if_checked(verify, impl, rows: Tensor, direction, weight, lora_a, lora_b,
                    flags) -> Optional[tuple]:
    """The call's key, or None when this call is not subject to the check at all."""
    if verify == "auto" and rows.device.type != "cuda":
        return None
    if torch.compiler.is_compiling() or _is_fake(rows) or rows.device.type == "meta":
        return None
    n, k = lora_b.shape[0], lora_a.shape[1]
    return (impl.NAME, direction, rows.device, rows.dtype, _weight_format(weight), lora_a.dtype,
            _bucket(rows.shape[0]), n, k, lora_a.shape[0], flags, impl.config_key())


def _weight_format(weight):
    """A dense weight's dtype; a 4-bit weight's quant type, blocksize, nesting and dtype (each
    a kernel of its own: NESTED and the blocksize are compile-time constants)."""
    if isinstance(weight, quantized.Packed4bit):
        return ("4-bit", weight.quant_type, weight.blocksize,
                weight.blocksize2 if weight.code2 is not None else 0, weight.dtype)
    return weight.dtype


def _bucket(m: int) -> int:
    return 1 << (m - 1).bit_length() if m > 0 else 0


def _capturing(t: Tensor) -> bool:
    return t.device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def _run(key, impl, run_kernel, run_reference, args, kwargs, find_mismatch, rows: Tensor):
    """The kernel's outputs for a key that passed, the reference's for one that failed; a new
    key's first call (not an empty batch, not during graph capture) is checked."""
    verdict = _verdicts.get(key)
    if verdict is True:
        return run_kernel(*args, **kwargs)
    if verdict is False:
        return run_reference(*args, **kwargs)
    if rows.shape[0] == 0 or _capturing(rows):
        return run_kernel(*args, **kwargs)
    return _first_use(key, run_kernel, run_reference, args, kwargs, find_mismatch,
                      lambda: _describe(key, rows.shape[0], impl))


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
            KernelVerificationWarning, stacklevel=6)
    return run_reference(*args, **kwargs)


_FLAG_NAMES = {
    "forward": ("bias", "dropout", "latent"),
    "backward": ("bias grad", "dropout", "latent", "need_x", "need_a", "need_b", "need_latent"),
    "DoRA forward": ("bias", "dropout", "latent", "Z kept"),
    "DoRA backward": ("bias grad", "dropout", "latent", "need_x", "need_a", "need_b",
                      "need_latent", "need_m", "Z from y"),
}


def _describe(key, m: int, impl) -> tuple[str, str]:
    """(shape, config) of a key, for the warning."""
    (backend, direction, device, x_dtype, w_format, a_dtype, bucket, n, k, r, flags,
     _config_key) = key
    name = lambda dt: str(dt).replace("torch.", "")  # noqa: E731
    present = [f for f, on in zip(_FLAG_NAMES[direction], flags) if on]
    if isinstance(w_format, tuple):
        _, quant_type, blocksize, blocksize2, dtype = w_format
        weight = (f"4-bit {quant_type} weight (blocksize {blocksize}"
                  + (f", nested absmax, blocksize {blocksize2}" if blocksize2 else "")
                  + f", {name(dtype)})")
    else:
        weight = f"weight {name(w_format)}"
    shape = (f"M={m} (bucket {bucket}), N={n}, K={k}, r={r} on {device}, x {name(x_dtype)}, "
             f"{weight}, adapters {name(a_dtype)}"
             + (f", {', '.join(present)}" if present else ""))
    try:
        config = impl.describe_config(direction, device, (bucket, n, k, r))
    except Exception as err:  # noqa: BLE001 - the description must not hide the failure
        config = f"n/a ({type(err).__name__}: {err})"
    return shape, config


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
    return _forward_checks(x, weight, bias, lora_a, lora_b_eff, scaling, dropout, y, p)


def _dora_forward_mismatch(outputs, x, weight, bias, lora_a, lora_b_eff, scaling, dropout, c, *,
                           need_z):
    """The DoRA forward's (y, P, Z) on sampled rows against both references, given c."""
    y, p, z = outputs
    return _forward_checks(x, weight, bias, lora_a, lora_b_eff, scaling, dropout, y, p,
                           c=c, got_z=z if need_z else None)


def _forward_checks(x, weight, bias, lora_a, lora_b_eff, scaling, dropout, y, p, *, c=None,
                    got_z=None) -> Optional[str]:
    """y and P (and Z, DoRA) on sampled rows. Plain: y = x·Wᵀ + bias + s·P·B_effᵀ. DoRA (c):
    y = c ⊙ Z + bias without dropout, else x·Wᵀ + bias + (c − 1) ⊙ x̃·Wᵀ + c ⊙ s·P·B_effᵀ, with
    Z = x̃·Wᵀ + s·P·B_effᵀ; PyTorch's low-precision run combines the terms in c's dtype, as the
    PyTorch backend does."""
    m, k = x.shape
    # a 4-bit W: bitsandbytes' dequantized values in x's dtype (what the kernels multiply by)
    weight = quantized.dense_like(weight, x.dtype)
    low = _low_rank_dtype(x.dtype, lora_a.dtype)
    budget = _budget(y, p, got_z)
    rows = _sample_rows(m, x.device)
    xs = x.index_select(0, rows)
    keep = _keep(dropout, rows, k)

    xd64 = _drop(xs.double(), keep, dropout)
    p64 = xd64 @ lora_a.double().T
    low_rank64 = scaling * (p64 @ lora_b_eff.double().T)
    base64 = _times_weight_t(xs.double(), weight, budget)
    # PyTorch's low-precision run: the PyTorch backend's formulas, low-rank operands in `low`.
    p_low = _drop(xs, keep, dropout).to(low) @ lora_a.to(low).T
    low_rank_low = scaling * (p_low @ lora_b_eff.to(low).T)
    z_check = []
    if c is None:
        y64 = base64 + low_rank64
        y_low = torch.nn.functional.linear(xs, weight, bias) + low_rank_low.to(x.dtype)
    else:
        acc, c64 = c.dtype, c.double()
        base_low = torch.nn.functional.linear(xs, weight).to(acc)
        if dropout is None:
            z64, z_low = base64 + low_rank64, base_low + low_rank_low.to(acc)
            y64, y_low = c64 * z64, c * z_low
        else:
            dropped64 = _times_weight_t(xd64, weight, budget)
            dropped_low = torch.nn.functional.linear(_drop(xs.to(acc), keep, dropout),
                                                     weight.to(acc))
            z64, z_low = dropped64 + low_rank64, dropped_low + low_rank_low.to(acc)
            y64 = base64 + (c64 - 1.0) * dropped64 + c64 * low_rank64
            y_low = base_low + (c - 1.0) * dropped_low + c * low_rank_low.to(acc)
        if bias is not None:
            y_low = y_low + bias.to(acc)
        y_low = y_low.to(x.dtype)
        if got_z is not None:
            z_check = [("Z", _rows_of(got_z, rows, m), z64, z_low.to(x.dtype))]
    if bias is not None:
        y64 += bias.double()
    checks = [("y", _rows_of(y, rows, m), y64, y_low), ("P", _rows_of(p, rows, m), p64, p_low)]
    return _judge(checks + z_check, _lowest(x.dtype, lora_a.dtype))


def _rows_of(t: Optional[Tensor], rows: Tensor, m: int) -> Optional[Tensor]:
    """The sampled rows of an output with M rows (one of another shape is judged as it is)."""
    return t.index_select(0, rows) if t is not None and t.dim() > 0 and t.shape[0] == m else t


def _backward_mismatch(outputs, grad_y, x, p, weight, lora_a, lora_b, scaling, dropout, *,
                       latent=None, need_x, need_a, need_b, need_latent=False, need_bias):
    """The backward's gradients against both references (dx on sampled rows, the reductions over
    M in chunks of rows); None when within the rule."""
    return _gradient_checks(tuple(outputs) + (None,), grad_y, x, p, weight, lora_a, lora_b,
                            latent, scaling, dropout, need_x=need_x, need_a=need_a,
                            need_b=need_b, need_latent=need_latent, need_bias=need_bias)


def _dora_backward_mismatch(outputs, grad_y, x, p, z, weight, lora_a, lora_b, latent, scaling,
                            dropout, c, norm, *, need_x, need_a, need_b, need_latent, need_bias,
                            need_m, z_is_output=False):
    """The DoRA backward's gradients (dm too) against both references, given c and the norm."""
    return _gradient_checks(outputs, grad_y, x, p, weight, lora_a, lora_b, latent, scaling,
                            dropout, need_x=need_x, need_a=need_a, need_b=need_b,
                            need_latent=need_latent, need_bias=need_bias, c=c, norm=norm, z=z,
                            need_m=need_m, z_is_output=z_is_output)


def _gradient_checks(outputs, grad_y, x, p, weight, lora_a, lora_b, latent, scaling, dropout, *,
                     need_x, need_a, need_b, need_latent, need_bias, c=None, norm=None, z=None,
                     need_m=False, z_is_output=False) -> Optional[str]:
    """Plain: the gradients for G. DoRA (c): those of x, A, B, R for G' = c ⊙ G (with dropout dx
    is G·W + dropout(((c − 1) ⊙ G)·W + dP·A)), dbias = Σ_rows G, dm = Σ_rows G ⊙ Z / norm
    (Z = y / c when ``z_is_output``)."""
    dx, da, db, dr, dbias, dm = outputs
    need_latent = need_latent and latent is not None
    need_m = need_m and c is not None
    m, n = grad_y.shape
    weight = quantized.dense_like(weight, grad_y.dtype)  # 4-bit: dequantized, as the forward
    k, r = weight.shape[1], lora_a.shape[0]
    base = grad_y.dtype
    low = _low_rank_dtype(base, lora_a.dtype)
    budget = _budget(dx, da, db, dr, dbias, dm) + m * r * 4  # + dP (M x r fp32), the call's own
    s = scaling
    a64, a_low = lora_a.double(), lora_a.to(low)
    b64, b_low = lora_b.double(), lora_b.to(low)
    r64 = None if latent is None else latent.double()
    r_low = None if latent is None else latent.to(low)
    acc = None if c is None else c.dtype
    c64 = None if c is None else c.double()

    def dp_of(t, latent_):  # dP from T = s·G·B (pytorch.latent_gradients)
        return t if latent_ is None else t @ latent_.T

    def scaled(g):  # G' = c ⊙ G (DoRA) in float64 and in the low dtype, else G
        if c is None:
            return g.double(), g.to(low)
        return g.double() * c64, (g.to(acc) * c).to(low)

    checks = []
    if need_a or need_b or need_latent or need_bias or need_m:
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
            g64, g_low = scaled(g)
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
                add("dbias", g.double().sum(0), g.sum(0))
            if need_m:
                zc = z[m0:m0 + step]
                add("dm", (g.double() * zc.double()).sum(0), (g.to(acc) * zc.to(acc)).sum(0))
        got = {"dA": da, "dB": db, "dR": dr, "dbias": dbias, "dm": dm}
        rounded = {"dbias": base, "dm": acc}
        for name in acc64:
            want64, want_low = acc64[name], acc_low[name]
            if name == "dm":  # Σ G ⊙ Z / norm; Z = y / c when y stood for it
                denominator = norm.double() * (c64 if z_is_output else 1.0)
                want64, want_low = want64 / denominator, want_low / denominator
            # PyTorch's single full reduction rounds once, to its result's dtype.
            checks.append((name, got[name], want64, want_low.to(rounded.get(name, low))))
    if need_x:
        rows = _sample_rows(m, grad_y.device)
        gs = grad_y.index_select(0, rows)
        keep = _keep(dropout, rows, k)
        gs64, gs_low = scaled(gs)
        dps64 = dp_of(s * (gs64 @ b64), r64)
        dps_low = dp_of(s * (gs_low @ b_low), r_low)
        if c is None or dropout is None:
            # (c ⊙ G)·W + dropout(dP·A): c folded into W's rows, as the PyTorch backend does
            w_low = weight if c is None else (c.unsqueeze(1) * weight.to(acc)).to(weight.dtype)
            dx64 = (_times_weight(gs64, weight, budget)
                    + _drop(dps64 @ a64, keep, dropout))
            dx_low = (gs @ w_low + _drop(dps_low @ a_low, keep, dropout).to(base)).to(base)
        else:  # G·W + dropout(((c − 1) ⊙ G)·W + dP·A)
            g64 = gs.double()
            dx64 = (_times_weight(g64, weight, budget)
                    + _drop(_times_weight(g64 * (c64 - 1.0), weight, budget) + dps64 @ a64,
                            keep, dropout))
            extra_low = ((gs.to(acc) * (c - 1.0)) @ weight.to(acc)
                         + (dps_low @ a_low).to(acc))
            dx_low = ((gs @ weight).to(acc) + _drop(extra_low, keep, dropout)).to(base)
        checks.append(("dx", _rows_of(dx, rows, m), dx64, dx_low))
    return _judge(checks, _lowest(base, lora_a.dtype))
