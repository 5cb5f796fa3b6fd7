"""The operator: two torch.library custom ops, ``lowrank_fused::forward`` and
``lowrank_fused::backward`` (what torch.compile traces, without graph breaks), and
``EagerLowRank``, an autograd.Function for eager calls (no dispatcher round trip: several times
cheaper on small shapes). Both run the same bodies, ``run_forward`` and ``run_backward``, and keep
the same tensors. DoRA (a magnitude m) and a 4-bit base are operands of the same ops: a
``quantized.Packed4bit`` crosses the custom ops as its packed bytes plus its quant state as
tensors, ints and a string (``Packed4bit.op_arguments``), and is rebuilt inside them.

What is saved follows what needs a gradient: x only for lora_a's (or an unfrozen weight's)
gradient; with lora_a frozen (LoRA-FA, LoRA-XS) only P = dropout(x)·Aᵀ (M x r). LoRA-XS's latent
R is folded into B_eff = B·Rᵀ for the forward, so every backend's forward sees one low-rank
shape and no N x r product is kept; the backward hands R to the backend, which takes dR from the
r-wide s·G·B it computes anyway (pytorch.latent_gradients). Dropout keeps its seed, never its
mask. DoRA adds c and ‖W + s·B_eff·A‖_row (N-vectors) and, when m trains, Z = x̃·Wᵀ + s·P·B_effᵀ
(M x N), or, without bias and dropout, the output y standing for it (Z = y / c). Should that y
be changed in place before backward (its version counter says so), Z is recomputed from x, or,
with A frozen (x not kept), ``InplaceOutputError`` says what to change; eagerly and under
torch.compile alike.

Each body asks ``dispatch.select`` for the backend module, counts the call (``stats``) and runs
the backend through ``verification`` (the first call of each kernel key on a GPU backend is
checked against the PyTorch backend).
"""
from __future__ import annotations

import itertools
from typing import NamedTuple, Optional, Union

import torch
from torch import Tensor

from . import dispatch, dora, quantized, stats, verification
from .dropout import DropoutSpec
from .errors import DoubleBackwardError, InplaceOutputError
from .tuning.key import method_of


class Call(NamedTuple):
    """The non-tensor arguments of one call, as the bodies take them."""

    scaling: float
    dropout_p: float  # 0.0 without dropout (or out of training)
    seed: Union[int, Tensor, None]  # an int (eager) or a 1-element int64 tensor (custom op)
    backend: str  # as asked: "auto", "reference", "triton" or "cuda"
    name: Optional[str] = None  # the call's label in ``stats``


def effective_lora_b(lora_b: Tensor, latent: Optional[Tensor]) -> Tensor:
    """B_eff = B·Rᵀ (N x r) when a latent R is present, else B."""
    return lora_b if latent is None else lora_b @ latent.T


def z_is_output(magnitude_grad: bool, bias: Optional[Tensor], dropout_p: float) -> bool:
    """Whether a DoRA call keeps its output y for dm instead of Z: m trains, no bias and no
    dropout, so Z = y / c."""
    return magnitude_grad and bias is None and dropout_p <= 0.0


# One C call that says whether any autocast is on; absent from a torch, it answers "maybe".
_any_autocast_enabled = getattr(torch._C, "_is_any_autocast_enabled", lambda: True)


def _autocast_type(t: Tensor) -> Optional[str]:
    """The device type whose autocast is on for t, or None (the common case: checked first,
    because entering a context costs about a microsecond a call)."""
    if not _any_autocast_enabled():
        return None
    device_type = t.device.type
    if device_type != "cuda":
        device_type = "cpu"
    return device_type if torch.is_autocast_enabled(device_type) else None


def _dropout(call: Call) -> Optional[DropoutSpec]:
    """None without dropout (no seed exists then)."""
    if call.dropout_p <= 0.0:
        return None
    seed = call.seed
    return DropoutSpec(call.dropout_p, int(seed.item()) if isinstance(seed, Tensor) else int(seed))


def _select(call: Call, rows: Tensor, weight, lora_a: Tensor, n: int, dora_call: bool, op: str,
            details: tuple) -> object:
    """The backend module for this call (``dispatch.select``, the one place a choice is made).
    ``details``: (function, arguments), called only by "auto" on a GPU for the rest of the
    call's tuning key and a way to run it (``dispatch.CallDetails``); a tuple, so that the
    common call builds no closure."""
    r, k = lora_a.shape
    return dispatch.select(call.backend, rows.device, rows.dtype, (rows.shape[0], n, k, r),
                           not isinstance(weight, Tensor), dora_call, op, details)


class _Unchecked:
    """``verification``'s entry points without the check: how a contender runs while "auto"
    times it (its outputs are discarded; the winner then runs checked)."""

    @staticmethod
    def forward(impl, *args, has_latent=False):
        return impl.forward(*args)

    @staticmethod
    def backward(impl, *args, **kwargs):
        return impl.backward(*args, **kwargs)

    @staticmethod
    def dora_forward(impl, *args, has_latent=False, **kwargs):
        return impl.dora_forward(*args, **kwargs)

    @staticmethod
    def dora_backward(impl, *args, **kwargs):
        return impl.dora_backward(*args, **kwargs)


def _flag_table(*names: str) -> dict:
    """{(on, ...): the names that are on, sorted} for every combination of ``names``: a call's
    tuning-key flags (``tuning.key.FLAGS``) by one lookup."""
    return {ons: tuple(sorted(n for n, on in zip(names, ons) if on))
            for ons in itertools.product((False, True), repeat=len(names))}


_FORWARD_FLAGS = _flag_table("bias", "dropout")
_BACKWARD_FLAGS = _flag_table("bias", "needs_dx", "dropout", "deterministic")


def run_forward(x, weight, bias, lora_a, lora_b, latent, magnitude, call: Call,
                magnitude_grad: bool = False, keep_z_where_c_is_zero: bool = False) -> tuple:
    """(y, P, Z, c, norm) for 2-D x: the body of the forward op, shared with the eager path.
    ``weight``: a dense tensor or a ``quantized.Packed4bit``. Z, c and norm are None without a
    magnitude; Z is None too when m does not train (``magnitude_grad``) or y stands for it
    (``z_is_output``), unless ``keep_z_where_c_is_zero`` and some c is 0 (Z = y / c fails there)."""
    device_type = _autocast_type(x)
    if device_type is None:
        return _forward(x, weight, bias, lora_a, lora_b, latent, magnitude, call, magnitude_grad,
                        keep_z_where_c_is_zero)
    with torch.autocast(device_type, enabled=False):  # applied by the caller: dtypes stay here
        return _forward(x, weight, bias, lora_a, lora_b, latent, magnitude, call, magnitude_grad,
                        keep_z_where_c_is_zero)


def _forward(x, weight, bias, lora_a, lora_b, latent, magnitude, call, magnitude_grad,
             keep_z_where_c_is_zero):
    b_eff = effective_lora_b(lora_b, latent)
    c = norm = None
    need_z = False
    if magnitude is not None:
        c, norm = dora.column_scale(weight, lora_a, b_eff, magnitude, call.scaling)
        need_z = magnitude_grad and (
            not z_is_output(True, bias, call.dropout_p)
            or (keep_z_where_c_is_zero and not c.is_meta and bool((c == 0).any())))
        b_eff = b_eff.detach()
    operands = (x, weight, bias, lora_a, b_eff, call, _dropout(call), latent is not None, c, norm,
                need_z)
    impl = _select(call, x, weight, lora_a, lora_b.shape[0], c is not None, "forward",
                   (_forward_details, operands))
    stats.record(call.name, impl.NAME, "forward")
    return _forward_pass(impl, verification, *operands)


def _forward_pass(impl, check, x, weight, bias, lora_a, b_eff, call, dropout, has_latent, c,
                  norm, need_z) -> tuple:
    """(y, P, Z, c, norm) of the forward on backend ``impl``, through ``check``
    (``verification``, or ``_Unchecked`` while "auto" times it)."""
    if c is None:
        y, p = check.forward(impl, x, weight, bias, lora_a, b_eff, call.scaling, dropout,
                             has_latent=has_latent)
        return y, p, None, None, None
    y, p, z = check.dora_forward(impl, x, weight, bias, lora_a, b_eff, call.scaling, dropout, c,
                                 need_z=need_z, has_latent=has_latent)
    return y, p, z, c, norm


def _forward_details(*operands) -> dispatch.CallDetails:
    """What "auto" on a GPU keys and times a forward on (every forward is "lora": its kernels
    do the same work for the three methods)."""
    x, weight, bias, lora_a, b_eff, call, dropout, has_latent, c, norm, need_z = operands
    return dispatch.CallDetails(lora_a.dtype, "lora",
                                _FORWARD_FLAGS[bias is not None, dropout is not None],
                                lambda module: _forward_pass(module, _Unchecked, *operands))


def run_backward(grad_y, x, p, z, weight, lora_a, lora_b, latent, c, norm, call: Call,
                 need_x, need_a, need_b, need_latent, need_bias, need_m=False,
                 z_is_output=False) -> tuple:
    """(dx, dA, dB, dR, dbias, dm), None for a gradient not asked for: the body of the backward
    op, shared with the eager path. A DoRA call has ``c`` and ``norm``; dm needs Z: ``z`` (the
    output y when ``z_is_output``), or, when None, Z recomputed from x."""
    args = (grad_y, x, p, z, weight, lora_a, lora_b, latent, c, norm, call, need_x, need_a,
            need_b, need_latent, need_bias, need_m, z_is_output)
    device_type = _autocast_type(grad_y)
    if device_type is None:
        return _backward_body(*args)
    with torch.autocast(device_type, enabled=False):  # the products keep the saved dtypes
        return _backward_body(*args)


def _backward_body(grad_y, x, p, z, weight, lora_a, lora_b, latent, c, norm, call, need_x,
                   need_a, need_b, need_latent, need_bias, need_m, z_is_output):
    need_latent = need_latent and latent is not None
    if c is not None:
        if need_m and z is not None and z_is_output and not c.is_meta and bool((c == 0).any()):
            z = None  # Z = y / c is lost where c = 0
        if need_m and z is None and x is None:
            raise _inplace_output_error(c)
    operands = (grad_y, x, p, z, weight, lora_a, lora_b, latent, c, norm, call, _dropout(call),
                need_x, need_a, need_b, need_latent, need_bias, need_m, z_is_output)
    impl = _select(call, grad_y, weight, lora_a, lora_b.shape[0], c is not None, "backward",
                   (_backward_details, operands))
    stats.record(call.name, impl.NAME, "backward")
    return _backward_pass(impl, verification, *operands)


def _backward_pass(impl, check, grad_y, x, p, z, weight, lora_a, lora_b, latent, c, norm, call,
                   dropout, need_x, need_a, need_b, need_latent, need_bias, need_m,
                   z_is_output) -> tuple:
    """(dx, dA, dB, dR, dbias, dm) of the backward on backend ``impl``, through ``check``
    (``verification``, or ``_Unchecked`` while "auto" times it); a DoRA Z that y no longer
    stands for is recomputed from x on the same backend."""
    if c is None:
        dx, da, db, dr, dbias = check.backward(
            impl, grad_y, x, p, weight, lora_a, lora_b, call.scaling, dropout, latent=latent,
            need_x=need_x, need_a=need_a, need_b=need_b, need_latent=need_latent,
            need_bias=need_bias)
        return dx, da, db, dr, dbias, None
    if need_m and z is None:
        z, z_is_output = _recompute_z(impl, x, weight, lora_a, lora_b, latent, call, check), False
    dx, da, db, dr, dbias, dm = check.dora_backward(
        impl, grad_y, x, p, z, weight, lora_a, lora_b, latent, call.scaling, dropout, c, norm,
        need_x=need_x, need_a=need_a, need_b=need_b, need_latent=need_latent,
        need_bias=need_bias, need_m=need_m, z_is_output=z_is_output)
    return dx, da, db, dr, dbias, None if dm is None else dm.to(lora_a.dtype)


def _backward_details(*operands) -> dispatch.CallDetails:
    """What "auto" on a GPU keys and times a backward on: the method by the gradients asked
    for, and what changes the kernels' work (bias and x gradients, dropout, deterministic
    reductions)."""
    (grad_y, x, p, z, weight, lora_a, lora_b, latent, c, norm, call, dropout, need_x, need_a,
     need_b, need_latent, need_bias, need_m, z_is_output) = operands
    flags = _BACKWARD_FLAGS[bool(need_bias), bool(need_x), dropout is not None,
                            torch.are_deterministic_algorithms_enabled()]
    return dispatch.CallDetails(lora_a.dtype, method_of(need_a, need_b, need_latent), flags,
                                lambda module: _backward_pass(module, _Unchecked, *operands))


def _inplace_output_error(c: Tensor) -> InplaceOutputError:
    """Z is needed for dm, y no longer stands for it, and x was not kept (lora_a frozen)."""
    zero = not c.is_meta and bool((c == 0).any())
    return InplaceOutputError(
        "lowrank_fused: the magnitude's gradient of a DoRA call without bias and dropout "
        "needs the call's output y (Z = y / c), and "
        + ("c = m / ‖W + s·B·A‖ has an exact zero (a zero in the magnitude), where y says "
           "nothing of Z" if zero else
           "y was changed in place before backward (e.g. nn.ReLU(inplace=True) after the "
           "layer)")
        + "; with lora_a frozen (DoRA-FA) x is not kept, so Z cannot be recomputed. Use an "
        "out-of-place op after the layer (nn.ReLU(inplace=False)), let lora_a train, or "
        "run the call eagerly (outside torch.compile an exact zero keeps Z)")


def _recompute_z(impl, x, weight, lora_a, lora_b, latent, call: Call, check) -> Tensor:
    """Z = x·Wᵀ + s·(x·Aᵀ)·B_effᵀ again (a call without bias and dropout, whose y stood for Z),
    from x (kept: ``_inplace_output_error`` otherwise)."""
    b_eff = effective_lora_b(lora_b, latent).detach()
    return check.forward(impl, x, weight, None, lora_a, b_eff, call.scaling, None,
                         has_latent=latent is not None)[0]


def _refuse_double_backward() -> None:
    """Autograd runs a backward with grad mode on only for create_graph=True. The kernels'
    gradients carry no graph, and P is saved without one (x is not even kept when A is frozen),
    so second-order gradients would come out silently wrong: refuse them instead."""
    if torch.is_grad_enabled() and not torch.compiler.is_compiling():
        raise DoubleBackwardError(
            "lowrank_fused does not support double backward: torch.autograd.grad(..., "
            "create_graph=True) or backward(create_graph=True) through low_rank_linear / "
            "LowRankLinear (gradient penalties, gradgradcheck, higher-order gradients) would give "
            "wrong second-order gradients, so it is refused. Compute the first-order gradients "
            "without create_graph, or use an unfused nn.Linear + low-rank composition for the "
            "layers that need second-order gradients")


def _weight_grad(grad_y, x, weight, need_w: bool, dora_call: bool):
    """W is frozen by design; if a caller unfroze a dense W, its gradient is one plain GEMM."""
    if not need_w:
        return None
    if dora_call:
        raise RuntimeError("the DoRA operator keeps W frozen: weight must not require grad")
    return (grad_y.T @ x).to(weight.dtype)


# ---- the custom ops (torch.compile) ----

def _weight_operand(weight, quant: tuple, n: int, k: int):
    """The dense weight, or the ``Packed4bit`` the op's 4-bit arguments (``quant``: absmax, code,
    absmax2, code2, offset, quant_type, blocksize, blocksize2, quant_dtype) describe."""
    if quant[0] is None:
        return weight
    return quantized.from_op_arguments(weight, *quant, n, k)


def _or_empty(t: Optional[Tensor], like: Tensor) -> Tensor:
    return t if t is not None else like.new_empty(0)


@torch.library.custom_op("lowrank_fused::forward", mutates_args=())
def forward_op(x: Tensor, weight: Tensor, bias: Optional[Tensor], lora_a: Tensor,
               lora_b: Tensor, latent: Optional[Tensor], scaling: float, dropout_p: float,
               seed: Optional[Tensor], backend: str, name: Optional[str] = None,
               magnitude: Optional[Tensor] = None, magnitude_grad: bool = False,
               absmax: Optional[Tensor] = None,
               code: Optional[Tensor] = None, absmax2: Optional[Tensor] = None,
               code2: Optional[Tensor] = None, offset: Optional[Tensor] = None,
               quant_type: Optional[str] = None, blocksize: int = 0, blocksize2: int = 0,
               quant_dtype: Optional[torch.dtype] = None
               ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(y, P, Z, c, norm) for 2-D x (``run_forward``); an empty tensor stands for an absent
    one. ``backend`` as asked ("auto", ...); ``seed``: a 1-element int64 tensor, or None without
    dropout; ``name`` labels the call in ``stats``; ``magnitude`` (DoRA) with
    ``magnitude_grad`` (m trains: Z is made); a 4-bit W (``quantized.Packed4bit``): ``weight``
    its packed bytes (uint8), ``absmax`` (uint8 indices when nested), ``code`` (16 values) and,
    nested, ``absmax2``, ``code2`` and ``offset``; ``quant_type`` "nf4" / "fp4", ``blocksize``
    (``blocksize2`` nested) and ``quant_dtype`` (what bitsandbytes dequantizes to)."""
    n, k = lora_b.shape[0], x.shape[1]
    w = _weight_operand(weight, (absmax, code, absmax2, code2, offset, quant_type, blocksize,
                                 blocksize2, quant_dtype), n, k)
    call = Call(scaling, dropout_p, seed, backend, name)
    y, p, z, c, norm = run_forward(x, w, bias, lora_a, lora_b, latent, magnitude, call,
                                   magnitude_grad)
    return y, p, _or_empty(z, x), _or_empty(c, x), _or_empty(norm, x)


def _norm_dtype(weight: Tensor, quant_type: Optional[str]) -> torch.dtype:
    """c's and the norm's dtype: fp64 over an fp64 W, else fp32 (4-bit included)."""
    return torch.float64 if quant_type is None and weight.dtype == torch.float64 else \
        torch.float32


@forward_op.register_fake
def _(x, weight, bias, lora_a, lora_b, latent, scaling, dropout_p, seed, backend, name=None,
      magnitude=None, magnitude_grad=False, absmax=None, code=None,
      absmax2=None, code2=None, offset=None, quant_type=None, blocksize=0, blocksize2=0,
      quant_dtype=None):
    m, n = x.shape[0], lora_b.shape[0]
    y, p = x.new_empty((m, n)), lora_a.new_empty((m, lora_a.shape[0]))
    if magnitude is None:
        return y, p, x.new_empty(0), x.new_empty(0), x.new_empty(0)
    keeps_z = magnitude_grad and not z_is_output(True, bias, dropout_p)
    acc = _norm_dtype(weight, quant_type)
    return (y, p, x.new_empty((m, n) if keeps_z else (0,)), x.new_empty((n,), dtype=acc),
            x.new_empty((n,), dtype=acc))


@torch.library.custom_op("lowrank_fused::backward", mutates_args=())
def backward_op(grad_y: Tensor, x: Optional[Tensor], p: Optional[Tensor], weight: Tensor,
                lora_a: Tensor, lora_b: Tensor, latent: Optional[Tensor], scaling: float,
                dropout_p: float, seed: Optional[Tensor], backend: str, need_x: bool,
                need_a: bool, need_b: bool, need_latent: bool, need_bias: bool,
                name: Optional[str] = None, z: Optional[Tensor] = None,
                c: Optional[Tensor] = None, norm: Optional[Tensor] = None, need_m: bool = False,
                z_is_output: bool = False,
                absmax: Optional[Tensor] = None, code: Optional[Tensor] = None,
                absmax2: Optional[Tensor] = None, code2: Optional[Tensor] = None,
                offset: Optional[Tensor] = None, quant_type: Optional[str] = None,
                blocksize: int = 0, blocksize2: int = 0,
                quant_dtype: Optional[torch.dtype] = None
                ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(dx, dA, dB, dR, dbias, dm) (``run_backward``); an empty tensor stands for a gradient
    not asked for. The arguments as ``forward_op``'s, plus what the forward kept: x, P, and for
    DoRA Z (or y when ``z_is_output``), c and the norm."""
    n, k = lora_b.shape[0], lora_a.shape[1]
    w = _weight_operand(weight, (absmax, code, absmax2, code2, offset, quant_type, blocksize,
                                 blocksize2, quant_dtype), n, k)
    grads = run_backward(grad_y, x, p, z, w, lora_a, lora_b, latent, c, norm,
                         Call(scaling, dropout_p, seed, backend, name), need_x=need_x,
                         need_a=need_a, need_b=need_b, need_latent=need_latent,
                         need_bias=need_bias, need_m=need_m, z_is_output=z_is_output)
    return tuple(_or_empty(t, grad_y) for t in grads)


@backward_op.register_fake
def _(grad_y, x, p, weight, lora_a, lora_b, latent, scaling, dropout_p, seed, backend,
      need_x, need_a, need_b, need_latent, need_bias, name=None, z=None, c=None, norm=None,
      need_m=False, z_is_output=False, absmax=None, code=None, absmax2=None,
      code2=None, offset=None, quant_type=None, blocksize=0, blocksize2=0, quant_dtype=None):
    def maybe(needed, like, shape):
        return like.new_empty(shape if needed else (0,))
    return (maybe(need_x, grad_y, (grad_y.shape[0], lora_a.shape[1])),
            maybe(need_a, lora_a, lora_a.shape),
            maybe(need_b, lora_b, lora_b.shape),
            maybe(need_latent and latent is not None, lora_a,
                  latent.shape if latent is not None else (0,)),
            maybe(need_bias, grad_y, (lora_b.shape[0],)),
            maybe(need_m and c is not None, lora_a, (lora_b.shape[0],)))


def _setup_context(ctx, inputs, output):
    (x, weight, bias, lora_a, lora_b, latent, scaling, dropout_p, seed, backend, name, magnitude,
     magnitude_grad, *quant) = inputs
    y, p, z, c, norm = output
    need_x, need_w, _, need_a, need_b, need_latent = ctx.needs_input_grad[:6]
    dora_call = magnitude is not None
    ctx.z_is_output = dora_call and z_is_output(magnitude_grad, bias, dropout_p)
    keep_z = dora_call and magnitude_grad and not ctx.z_is_output
    # the op's outputs as detached aliases (EagerLowRank says why), so that each unpacks alone
    ctx.save_for_backward(
        x if (need_a or need_w) else None,
        p.detach() if (need_b or need_latent) else None,
        y.detach() if ctx.z_is_output else (z if keep_z else None),
        weight, lora_a, lora_b, latent,  # parameters: no activation memory
        c.detach() if dora_call else None, norm.detach() if dora_call else None,  # N-vectors
        *quant[:5])  # a 4-bit W's quant state: the parameter's own tensors
    ctx.call = Call(scaling, dropout_p, seed, backend, name)  # the seed: one integer
    ctx.quant_format = dict(zip(("quant_type", "blocksize", "blocksize2", "quant_dtype"),
                                quant[5:]))


def _backward(ctx, grad_y, *unused):
    _refuse_double_backward()
    (x, p, z, weight, lora_a, lora_b, latent, c, norm, absmax, code, absmax2, code2,
     offset) = _unpack_tolerating_output(ctx) if ctx.z_is_output else ctx.saved_tensors
    need = ctx.needs_input_grad
    need_x, need_w, need_bias, need_a, need_b, need_latent = need[:6]
    need_m = len(need) > 11 and need[11]  # magnitude: an argument only where given
    dw = _weight_grad(grad_y, x, weight, need_w, c is not None)
    call = ctx.call
    outs = backward_op(
        grad_y.contiguous(), x, p, weight, lora_a, lora_b, latent, call.scaling, call.dropout_p,
        call.seed, call.backend, need_x, need_a, need_b, need_latent and latent is not None,
        need_bias, call.name, z=z, c=c, norm=norm, need_m=need_m and c is not None,
        z_is_output=ctx.z_is_output and z is not None, absmax=absmax, code=code, absmax2=absmax2,
        code2=code2, offset=offset, **ctx.quant_format)
    dx, da, db, dr, dbias, dm = (g if needed else None for g, needed in
                                 zip(outs, (need_x, need_a, need_b, need_latent, need_bias,
                                            need_m)))
    return (dx, dw, dbias, da, db, dr) + (None,) * 5 + (dm,) + (None,) * 10


forward_op.register_autograd(_backward, setup_context=_setup_context)


# ---- eager calls ----

class EagerLowRank(torch.autograd.Function):
    """The custom ops' bodies and saved tensors without their dispatcher round trip: what eager
    calls take (several times cheaper on small shapes). ``weight`` is a dense tensor or a
    ``quantized.Packed4bit``; ``call`` the non-tensor arguments. Returns y."""

    # forward takes ctx (no setup_context): apply() then skips binding arguments by signature.
    @staticmethod
    def forward(ctx, x, weight, bias, lora_a, lora_b, latent, magnitude, call):
        need = ctx.needs_input_grad
        keep_x, need_m = need[3] or need[1], need[6]
        y, p, z, c, norm = run_forward(x, weight, bias, lora_a, lora_b, latent, magnitude, call,
                                       need_m, not keep_x)
        dense = isinstance(weight, Tensor)
        z_is_output = need_m and z is None
        # y as a detached alias (same storage and version counter, not the output itself), so
        # the backward can unpack it alone and see whether it was changed in place
        ctx.save_for_backward(x if keep_x else None, p if (need[4] or need[5]) else None,
                              y.detach() if z_is_output else z, weight if dense else None,
                              lora_a, lora_b, latent)
        # a Packed4bit holds the parameter's own tensors; c and the norm are N-vectors
        ctx.state = (call, z_is_output, None if dense else weight, c, norm)
        return y

    @staticmethod
    def backward(ctx, grad_y):
        _refuse_double_backward()
        call, z_is_output, packed, c, norm = ctx.state
        if z_is_output:
            x, p, z, weight, lora_a, lora_b, latent = _unpack_tolerating_output(ctx)
        else:
            x, p, z, weight, lora_a, lora_b, latent = ctx.saved_tensors
        need_x, need_w, need_bias, need_a, need_b, need_latent, need_m = \
            ctx.needs_input_grad[:7]
        dw = _weight_grad(grad_y, x, weight, need_w, c is not None) if need_w else None
        dx, da, db, dr, dbias, dm = run_backward(
            grad_y, x, p, z, packed if weight is None else weight, lora_a, lora_b, latent, c,
            norm, call, need_x, need_a, need_b, need_latent, need_bias, need_m,
            z is not None and z_is_output)
        return dx, dw, dbias, da, db, dr, dm, None


def _unpack_tolerating_output(ctx) -> list:
    """The saved tensors, with None for the output y (index 2) if it was changed in place since
    the forward (autograd refuses to unpack it then): the backward recomputes Z instead."""
    out = []
    for i, saved in enumerate(ctx._raw_saved_tensors):
        try:
            out.append(saved.unpack())
        except RuntimeError:  # "modified by an inplace operation"
            if i != 2:
                raise
            out.append(None)
    return out
