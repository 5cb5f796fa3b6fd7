"""The public operator: ``low_rank_linear``."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from . import quantized
from .dropout import seed_tensor
from .ops import Call, EagerLowRank, forward_op, run_forward
from .validation import check_call_arguments, check_operator_inputs


def low_rank_linear(
    x: Tensor,
    weight: Tensor,
    lora_a: Tensor,
    lora_b: Tensor,
    *,
    bias: Optional[Tensor] = None,
    latent: Optional[Tensor] = None,
    scaling: float = 1.0,
    dropout_p: float = 0.0,
    training: bool = True,
    backend: str = "auto",
    dropout_seed: Optional[int] = None,
    magnitude: Optional[Tensor] = None,
    name: Optional[str] = None,
) -> Tensor:
    """y = x·Wᵀ + bias + scaling · dropout(x)·Aᵀ·R·Bᵀ, forward and backward fused.

    Args:
        x: input, shape (..., K), same dtype as ``weight``.
        weight: frozen base weight W, shape (N, K) (nn.Linear's layout), or a bitsandbytes
            ``Params4bit`` (QLoRA: NF4/FP4, any blocksize, nested absmax or not) holding it:
            dequantized to x's dtype as ``bnb.matmul_4bit`` does: inside the GEMMs' K loops on
            the Triton backend ("triton", and "cuda", whose C++ kernels have no 4-bit path),
            per call on the reference backend ("auto" on CUDA tensors times the two per
            shape); never saved dense.
        lora_a: A, shape (r, K). Freeze it (``requires_grad=False``) and x is never saved for
            backward: only P = dropout(x)·Aᵀ, shape (M, r).
        lora_b: B, shape (N, r).
        bias: optional base bias, shape (N,).
        latent: optional LoRA-XS matrix R, shape (r, r); absent means R = I.
        scaling: s, usually alpha / r.
        dropout_p: dropout probability on the low-rank branch's input (PEFT's lora_dropout).
            The mask is regenerated from a seed in backward, never stored.
        training: dropout is applied only when True.
        backend: "auto", "reference", "triton" or "cuda"; the environment variable
            ``LOWRANK_FUSED_BACKEND`` replaces "auto". "auto" on CUDA tensors runs, per shape
            and pass, the fastest of the fused kernels and the reference (timed once,
            remembered: ``lowrank_fused.tuning_report()``); elsewhere the reference.
        dropout_seed: seed of the dropout mask; drawn from torch's RNG when None.
        magnitude: DoRA's magnitude m, shape (N,), the adapters' dtype: then
            y = c ⊙ (x·Wᵀ + s·P·B_effᵀ) + bias with c = m / ‖W + s·B_eff·A‖_row (detached,
            recomputed each call), and with dropout PEFT's rule
            y = x·Wᵀ + bias + (c − 1) ⊙ x̃·Wᵀ + c ⊙ s·P·B_effᵀ (``lowrank_fused.dora``). Runs
            on the Triton backend for "triton" and "cuda" (the CUDA extension has no DoRA
            kernels), on the faster of Triton and the reference per shape for "auto" on CUDA
            tensors; over a 4-bit weight (QDoRA) on the reference backend
            (``dispatch.select``). Without bias and dropout the output stands for what m's
            gradient needs: changed in place before backward, that is recomputed from x, or,
            with lora_a frozen, ``InplaceOutputError`` says what to change.
        name: a label for the call counts of ``lowrank_fused.stats`` (a layer's module name);
            None counts the call as unnamed.

    Adapters (lora_a, lora_b, latent) share one dtype, which may differ from x's (fp32
    adapters on a bf16 base, as PEFT keeps them); y has x's dtype and every gradient its own
    tensor's dtype.

    Returns:
        y, shape (..., N).

    Raises:
        ValueError: mismatched shapes, rank < 1, tensors on several devices, dropout_p outside
            [0, 1), non-finite scaling or a scaling tensor that requires grad, dropout_seed
            outside [0, 2**63), unknown backend.
        ValueError (4-bit): a Params4bit without a quant state, or a quant state missing a
            field (absmax, shape, code, blocksize, quant_type, dtype; offset and state2 when
            nested), named in the message.
        TypeError: x not a tensor, non-floating dtypes, x and weight of different dtypes,
            adapters of mixed dtypes, scaling not a number, dropout_p not a number, dropout_seed
            not an int.
        lowrank_fused.BackendUnavailableError: the backend asked for cannot run here.
        lowrank_fused.DoubleBackwardError: a backward with create_graph=True through it.
        With ``magnitude``: ValueError for a shape other than (N,) or another device than x's;
        TypeError for a non-tensor, a non-floating dtype or another dtype than
        the adapters'.
    """
    check_call_arguments(x, scaling, dropout_seed)
    if torch.compiler.is_compiling():
        return _traced_call(x, weight, lora_a, lora_b, bias, latent, scaling, dropout_p,
                            training, backend, dropout_seed, magnitude, name)
    if _any_autocast_enabled():
        x, weight, bias = _autocast_base(x, weight, bias)
    if quantized.is_4bit(weight):  # a quant state can change between calls: checked each call
        weight = quantized.packed(weight)
        check_operator_inputs(x, weight, lora_a, lora_b, bias, latent, dropout_p, magnitude)
    else:
        _check_inputs_once(x, weight, lora_a, lora_b, bias, latent, dropout_p, magnitude)
    dropout_p = float(dropout_p) if training else 0.0
    seed = _draw_seed(dropout_seed) if dropout_p > 0.0 else None
    call = Call(float(scaling), dropout_p, seed, backend, name)
    rows = x if x.dim() == 2 else x.reshape(-1, x.shape[-1])
    # Eager: the custom ops' bodies through an autograd.Function, without the dispatcher's
    # cost; with nothing to differentiate, the forward body alone.
    if torch.is_grad_enabled() and _any_requires_grad(x, weight, bias, lora_a, lora_b, latent,
                                                      magnitude):
        y2d = EagerLowRank.apply(rows, weight, bias, lora_a, lora_b, latent, magnitude, call)
    else:
        y2d = run_forward(rows, weight, bias, lora_a, lora_b, latent, magnitude, call)[0]
    return y2d if x.dim() == 2 else y2d.reshape(*x.shape[:-1], y2d.shape[1])


def _traced_call(x, weight, lora_a, lora_b, bias, latent, scaling, dropout_p, training, backend,
                 dropout_seed, magnitude, name):
    """low_rank_linear under torch.compile: the custom ops, which it traces without a graph
    break (a 4-bit weight as its packed bytes and quant state tensors)."""
    x, weight, bias = _autocast_base(x, weight, bias)
    quant = (None,) * 5 + (None, 0, 0, None)  # a dense W: no quant state
    if quantized.is_4bit(weight):
        packed = quantized.packed(weight)
        check_operator_inputs(x, packed, lora_a, lora_b, bias, latent, dropout_p, magnitude)
        weight, *quant = packed.op_arguments()
    else:
        check_operator_inputs(x, weight, lora_a, lora_b, bias, latent, dropout_p, magnitude)
    dropout_p = float(dropout_p) if training else 0.0
    seed = seed_tensor(dropout_seed) if dropout_p > 0.0 else None
    magnitude_grad = (magnitude is not None and magnitude.requires_grad
                      and torch.is_grad_enabled())
    rows = x if x.dim() == 2 else x.reshape(-1, x.shape[-1])
    y2d = forward_op(rows, weight, bias, lora_a, lora_b, latent, float(scaling), dropout_p,
                     seed, backend, name, magnitude, magnitude_grad, *quant)[0]
    return y2d if x.dim() == 2 else y2d.reshape(*x.shape[:-1], y2d.shape[1])


# One C call that says whether any autocast is on (eager only: compile keeps the public checks);
# absent from a torch, it answers "maybe" and the full check runs.
_any_autocast_enabled = getattr(torch._C, "_is_any_autocast_enabled", lambda: True)


def _draw_seed(seed: Optional[int]) -> int:
    """The dropout seed as an int: ``seed`` if given, else drawn from torch's global RNG (as
    seed_tensor draws it, so one torch.manual_seed gives the same mask on both paths)."""
    return int(seed) if seed is not None else int(seed_tensor(None).item())


# Signatures (shapes, dtypes, devices, dropout_p) already checked: a repeated call with the same
# ones skips validation. Keys are plain values, never tensor identities; bounded so that a
# stream of new shapes cannot grow it without limit.
_CHECKED: dict = {}
_CHECKED_LIMIT = 4096


def _any_requires_grad(*tensors) -> bool:
    for t in tensors:
        if isinstance(t, Tensor) and t.requires_grad:
            return True
    return False


def _signature(t):
    return (t.shape, t.dtype, t.device)


def _check_inputs_once(x, weight, lora_a, lora_b, bias, latent, dropout_p, magnitude) -> None:
    try:
        key = (x.shape, x.dtype, x.device, weight.shape, weight.dtype, weight.device,
               lora_a.shape, lora_a.dtype, lora_a.device, lora_b.shape, lora_b.dtype,
               lora_b.device, dropout_p,
               None if bias is None else _signature(bias),
               None if latent is None else _signature(latent),
               None if magnitude is None else _signature(magnitude))
        checked = key in _CHECKED
    except (AttributeError, TypeError):  # not tensors: let the checks say what is wrong
        check_operator_inputs(x, weight, lora_a, lora_b, bias, latent, dropout_p, magnitude)
        return
    if checked:
        return
    check_operator_inputs(x, weight, lora_a, lora_b, bias, latent, dropout_p, magnitude)
    if len(_CHECKED) >= _CHECKED_LIMIT:
        _CHECKED.clear()
    _CHECKED[key] = True


def _autocast_base(x, weight, bias):
    """Under torch.autocast, the base GEMM runs in the autocast dtype as nn.Linear's does; the
    adapters keep their own dtype. The casts are differentiable, so gradients come back in each
    tensor's own dtype."""
    device_type = x.device.type
    if device_type != "cuda" and device_type != "cpu" or not torch.is_autocast_enabled(device_type):
        return x, weight, bias
    dtype = torch.get_autocast_dtype(device_type)
    cast = lambda t: t if t is None or not t.is_floating_point() else t.to(dtype)  # noqa: E731
    # a 4-bit weight stays packed: the reference dequantizes it to x's (now autocast) dtype
    return cast(x), (weight if quantized.is_4bit(weight) else cast(weight)), cast(bias)
