"""The public operator: ``low_rank_linear``."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from . import dispatch
from .dropout import seed_tensor
from .ops import forward_op
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
) -> Tensor:
    """y = x·Wᵀ + bias + scaling · dropout(x)·Aᵀ·R·Bᵀ, forward and backward fused.

    Args:
        x: input, shape (..., K), same dtype as ``weight``.
        weight: frozen base weight W, shape (N, K) (nn.Linear's layout).
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
            ``LOWRANK_FUSED_BACKEND`` replaces "auto".
        dropout_seed: seed of the dropout mask; drawn from torch's RNG when None.

    Adapters (lora_a, lora_b, latent) share one dtype, which may differ from x's (fp32
    adapters on a bf16 base, as PEFT keeps them); y has x's dtype and every gradient its own
    tensor's dtype.

    Returns:
        y, shape (..., N).

    Raises:
        ValueError: mismatched shapes, rank < 1, tensors on several devices, dropout_p outside
            [0, 1), non-finite scaling or a scaling tensor that requires grad, dropout_seed
            outside [0, 2**63), unknown backend.
        TypeError: x not a tensor, non-floating dtypes, x and weight of different dtypes,
            adapters of mixed dtypes, scaling not a number, dropout_p not a number, dropout_seed
            not an int.
        lowrank_fused.BackendUnavailableError: the backend asked for cannot run here.
    """
    check_call_arguments(x, scaling, dropout_seed)
    x, weight, bias = _autocast_base(x, weight, bias)
    check_operator_inputs(x, weight, lora_a, lora_b, bias, latent, dropout_p)
    backend_name = dispatch.resolved_name(backend, x.device,
                                          dispatch.call_kind(x, weight, lora_a, lora_b, latent))

    dropout_p = float(dropout_p) if training else 0.0
    seed = seed_tensor(dropout_seed if dropout_p > 0.0 else 0)

    n, k = weight.shape
    y2d, _ = forward_op(x.reshape(-1, k), weight, bias, lora_a, lora_b, latent, float(scaling),
                        dropout_p, seed, backend_name)
    return y2d.reshape(*x.shape[:-1], n)


def _autocast_base(x, weight, bias):
    """Under torch.autocast, the base GEMM runs in the autocast dtype as nn.Linear's does; the
    adapters keep their own dtype. The casts are differentiable, so gradients come back in each
    tensor's own dtype."""
    device_type = x.device.type
    if device_type not in ("cuda", "cpu") or not torch.is_autocast_enabled(device_type):
        return x, weight, bias
    dtype = torch.get_autocast_dtype(device_type)
    cast = lambda t: t if t is None or not t.is_floating_point() else t.to(dtype)  # noqa: E731
    return cast(x), cast(weight), cast(bias)
