"""The operator as two torch.library custom ops, with its autograd formula and fake (meta)
implementations, so torch.compile traces it without graph breaks.

What is saved follows what needs a gradient: x only for lora_a's (or an unfrozen weight's)
gradient; with lora_a frozen (LoRA-FA, LoRA-XS) only P = dropout(x)·Aᵀ (M x r). LoRA-XS's latent
R is folded into B_eff = B·Rᵀ for the forward, so every backend's forward sees one low-rank
shape and no N x r product is kept; the backward hands R to the backend, which takes dR from the
r-wide s·G·B it computes anyway (reference.latent_gradients). Dropout keeps its seed, never its mask.
Each backend call goes through ``verification``, which checks the first call of each kernel key
on a GPU backend against the reference backend (``LOWRANK_FUSED_VERIFY``).
"""
from __future__ import annotations


from typing import Optional

import torch
from torch import Tensor

from . import dispatch, quantized, stats, verification
from .dropout import DropoutSpec
from .errors import DoubleBackwardError


def effective_lora_b(lora_b: Tensor, latent: Optional[Tensor]) -> Tensor:
    """B_eff = B·Rᵀ (N x r) when a latent R is present, else B."""
    return lora_b if latent is None else lora_b @ latent.T


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


def _without_autocast(t: Tensor, fn, *args, **kwargs):
    """fn(*args, **kwargs) with every tensor keeping its dtype: the caller already applied
    autocast."""
    device_type = _autocast_type(t)
    if device_type is None:
        return fn(*args, **kwargs)
    with torch.autocast(device_type, enabled=False):
        return fn(*args, **kwargs)


def _dropout(dropout_p: float, seed) -> Optional[DropoutSpec]:
    """``seed`` is an int (eager path) or a 1-element int64 tensor (custom op); None without
    dropout, so no seed tensor exists then."""
    if dropout_p <= 0.0:
        return None
    return DropoutSpec(dropout_p, int(seed.item()) if isinstance(seed, Tensor) else int(seed))


def _shape(rows: Tensor, weight: Tensor, lora_a: Tensor) -> tuple:
    """(dtype, M, N, K, r) of a call, for a policy tag made concrete per shape (dispatch.shape_choice)."""
    n, k = quantized.shape(weight)
    return (weight.dtype, rows.shape[0], n, k, lora_a.shape[0])


def backend_name(impl) -> str:
    """"reference", "triton" or "cuda": the name of a backend module."""
    return impl.__name__.rpartition(".")[2]


def run_forward(x, weight, bias, lora_a, lora_b, latent, scaling, dropout_p, seed, backend,
                name=None):
    """(y, P) for 2-D x: the body of the forward op, shared with the eager path."""
    tagged = dispatch.is_policy_tag(backend)  # only a policy tag needs the shape
    impl = dispatch.backend_module(backend, x.device, _shape(x, weight, lora_a) if tagged else None)
    stats.record(name, backend_name(impl), "forward")
    return _without_autocast(x, verification.forward, impl, x, weight, bias, lora_a,
                             effective_lora_b(lora_b, latent), scaling, _dropout(dropout_p, seed),
                             has_latent=latent is not None)


@torch.library.custom_op("lowrank_fused::forward", mutates_args=())
def forward_op(x: Tensor, weight: Tensor, bias: Optional[Tensor], lora_a: Tensor,
               lora_b: Tensor, latent: Optional[Tensor], scaling: float, dropout_p: float,
               seed: Optional[Tensor], backend: str, name: Optional[str] = None
               ) -> tuple[Tensor, Tensor]:
    """(y, P) for 2-D x; ``backend`` comes from dispatch.call_choice, ``seed`` is a 1-element
    int64 tensor, or None without dropout; ``name`` labels the call in ``stats``."""
    return run_forward(x, weight, bias, lora_a, lora_b, latent, scaling, dropout_p, seed, backend,
                       name)


@forward_op.register_fake
def _(x, weight, bias, lora_a, lora_b, latent, scaling, dropout_p, seed, backend, name=None):
    return (x.new_empty((x.shape[0], quantized.shape(weight)[0])),
            lora_a.new_empty((x.shape[0], lora_a.shape[0])))


def run_backward(grad_y, x, p, weight, lora_a, lora_b, latent, scaling, dropout_p, seed, backend,
                 need_x, need_a, need_b, need_latent, need_bias, name=None) -> tuple:
    """(dx, dA, dB, dR, dbias), None for a gradient not asked for: the body of the backward
    op, shared with the eager path."""
    impl = dispatch.backend_module(backend, grad_y.device, _shape(grad_y, weight, lora_a))
    stats.record(name, backend_name(impl), "backward")
    dx, da, db, dr, dbias = _without_autocast(
        grad_y, verification.backward, impl, grad_y, x, p, weight, lora_a, lora_b, scaling,
        _dropout(dropout_p, seed), latent=latent, need_x=need_x, need_a=need_a, need_b=need_b,
        need_latent=need_latent, need_bias=need_bias)
    return dx, da, db, dr, dbias


@torch.library.custom_op("lowrank_fused::backward", mutates_args=())
def backward_op(grad_y: Tensor, x: Optional[Tensor], p: Optional[Tensor], weight: Tensor,
                lora_a: Tensor, lora_b: Tensor, latent: Optional[Tensor], scaling: float,
                dropout_p: float, seed: Optional[Tensor], backend: str, need_x: bool,
                need_a: bool, need_b: bool, need_latent: bool, need_bias: bool,
                name: Optional[str] = None) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(dx, dA, dB, dR, dbias); an empty tensor stands for a gradient not asked for."""
    grads = run_backward(grad_y, x, p, weight, lora_a, lora_b, latent, scaling, dropout_p, seed,
                         backend, need_x, need_a, need_b, need_latent, need_bias, name)
    return tuple(t if t is not None else grad_y.new_empty(0) for t in grads)


@backward_op.register_fake
def _(grad_y, x, p, weight, lora_a, lora_b, latent, scaling, dropout_p, seed, backend,
      need_x, need_a, need_b, need_latent, need_bias, name=None):
    def maybe(needed, like, shape):
        return like.new_empty(shape if needed else (0,))
    return (maybe(need_x, grad_y, (grad_y.shape[0], quantized.shape(weight)[1])),
            maybe(need_a, lora_a, lora_a.shape),
            maybe(need_b, lora_b, lora_b.shape),
            maybe(need_latent and latent is not None, lora_a,
                  latent.shape if latent is not None else (0,)),
            maybe(need_bias, weight, (weight.shape[0],)))


def _setup_context(ctx, inputs, output):
    x, weight, bias, lora_a, lora_b, latent, scaling, dropout_p, seed, backend, name = inputs
    _, p = output
    need_x, need_w, _, need_a, need_b, need_latent = ctx.needs_input_grad[:6]
    ctx.save_for_backward(
        x if (need_a or need_w) else None,
        p if (need_b or need_latent) else None,
        weight, lora_a, lora_b, latent,  # parameters: no activation memory
    )
    ctx.scaling, ctx.dropout_p, ctx.backend, ctx.name = scaling, dropout_p, backend, name
    ctx.seed = seed  # kept off save_for_backward: one integer, not an activation


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


def _backward(ctx, grad_y, grad_p, backward_fn=None):
    _refuse_double_backward()
    x, p, weight, lora_a, lora_b, latent = ctx.saved_tensors
    need_x, need_w, need_bias, need_a, need_b, need_latent = ctx.needs_input_grad[:6]
    grad_y = grad_y.contiguous()
    outs = (backward_fn or backward_op)(
        grad_y, x, p, weight, lora_a, lora_b, latent, ctx.scaling, ctx.dropout_p, ctx.seed,
        ctx.backend, need_x, need_a, need_b, need_latent and latent is not None, need_bias,
        ctx.name)
    dx, da, db, dr, dbias = (g if needed else None for g, needed in
                             zip(outs, (need_x, need_a, need_b, need_latent, need_bias)))
    # W is frozen by design; if a caller unfroze it, its gradient is one plain GEMM.
    dw = (grad_y.T @ x).to(weight.dtype) if need_w else None
    return dx, dw, dbias, da, db, dr, None, None, None, None, None


forward_op.register_autograd(_backward, setup_context=_setup_context)


class EagerLowRank(torch.autograd.Function):
    """The same forward, saved tensors and backward as the custom ops, without the custom ops'
    dispatcher round trip: what eager calls take (several times cheaper on small shapes).
    torch.compile traces the custom ops instead (see functional.low_rank_linear)."""

    # forward takes ctx (no setup_context): apply() then skips binding arguments by signature.
    @staticmethod
    def forward(ctx, x, weight, bias, lora_a, lora_b, latent, scaling, dropout_p, seed, backend,
                name):
        inputs = (x, weight, bias, lora_a, lora_b, latent, scaling, dropout_p, seed, backend, name)
        output = run_forward(*inputs)
        _setup_context(ctx, inputs, output)
        ctx.mark_non_differentiable(output[1])
        return output

    @staticmethod
    def backward(ctx, grad_y, grad_p):
        return _backward(ctx, grad_y, grad_p, backward_fn=run_backward)
