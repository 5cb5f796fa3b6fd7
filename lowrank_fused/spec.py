"""The operator's math in plain PyTorch: the specification every backend and kernel is held to.

No tricks: no chunks, no caches, no sparse paths, no fused adds; each formula as written below,
the gradients explicit (tests/test_spec.py checks them against autograd of ``forward`` and the
DoRA rule against PEFT's own layer). The spec computes in the dtype of its tensors (one for all):
in float64 it is the truth of the tests' tolerance rule (tests/tolerance.py); in a 16-bit dtype
it is PyTorch doing the same math in low precision.

Shapes (nn.Linear's layout, PEFT's tensors): x (..., K), taken as (M, K); W (N, K); bias (N,);
A = lora_a (r, K); B = lora_b (N, r); R = latent (r, r), the identity when absent; m = magnitude
(N,), DoRA only; s = scaling. The methods differ only in what trains: LoRA A and B, LoRA-FA B,
LoRA-XS R (W is frozen in all of them). A 4-bit W enters dense: the caller dequantizes it.

Dropout on the low-rank branch: ``keep`` (bool, x's shape) is the project's mask
(``keep_mask``: lowrank_fused.dropout's definition), q = quantised_p(p), D = keep / (1 − q),
x̃ = D ⊙ x. Without dropout D = 1 and x̃ = x.

Forward (B_eff = B·Rᵀ, so P·R·Bᵀ = P·B_effᵀ):
    P = x̃·Aᵀ                                          (M, r): kept instead of x when A is frozen
    y = x·Wᵀ + bias + s·P·B_effᵀ                                        the plain operator
    y = x·Wᵀ + bias + (c − 1) ⊙ x̃·Wᵀ + c ⊙ s·P·B_effᵀ                  DoRA (PEFT's rule)
        c = m / ‖W + s·B_eff·A‖_row (N,), scaling output column n by c_n; the norm detached
        (DoRA §4.3): a constant to the gradients.
        Without dropout (x̃ = x) this is c ⊙ (x·Wᵀ + s·P·B_effᵀ) + bias; with c = 1 it is the
        plain operator.

Backward (G = ∂L/∂y as (M, N); G_c = c ⊙ G, G itself for the plain operator):
    T     = s·G_c·B                   (M, r)  one pass over G gives T and dB
    dP    = T·Rᵀ                      (M, r)
    dR    = Pᵀ·T                      (r, r)  LoRA-XS
    dB    = s·G_cᵀ·(P·R)              (N, r)  LoRA, LoRA-FA
    dA    = dPᵀ·x̃                     (r, K)  LoRA: the one place x is needed
    dx̃    = dP·A + ((c − 1) ⊙ G)·W    (M, K)  the gradient reaching x through x̃
    dx    = G·W + D ⊙ dx̃                      (no dropout, DoRA: G_c·W + dP·A)
    dbias = Σ_rows G
    dm    = Σ_rows G ⊙ (x̃·Wᵀ + s·P·B_effᵀ) / ‖W + s·B_eff·A‖_row      DoRA
    dW    = Gᵀ·x + ((c − 1) ⊙ G)ᵀ·x̃   (W is frozen in every method: for a caller who unfreezes it)
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from . import dropout


def keep_mask(x_shape, seed: int, p: float, device=None) -> Tensor:
    """The keep-mask (bool, of ``x_shape``) of dropout at rate ``p`` with ``seed``: the project's
    definition (``dropout.keep_mask``) over x's rows taken as (M, K), row i being row i of M."""
    *lead, k = x_shape
    rows = torch.arange(math.prod(lead), device=device)
    return dropout.keep_mask(seed, p, rows, torch.arange(k, device=device)).reshape(x_shape)


def row_norm(weight: Tensor, lora_a: Tensor, lora_b_eff: Tensor, scaling: float) -> Tensor:
    """‖W + s·B_eff·A‖ of each row (N,), from the dense N x K matrix."""
    return torch.linalg.norm(weight + scaling * (lora_b_eff @ lora_a), dim=1)


@dataclass
class Gradients:
    """Every gradient of the operator; ``dr`` without a latent, ``dbias`` without a bias and
    ``dm`` without a magnitude are None. dx has x's shape."""
    dx: Tensor
    dw: Tensor
    da: Tensor
    db: Tensor
    dr: Optional[Tensor]
    dbias: Optional[Tensor]
    dm: Optional[Tensor]


def _one_dtype(*tensors) -> None:
    dtypes = {t.dtype for t in tensors if t is not None}
    if len(dtypes) != 1:
        raise TypeError("the spec computes in one dtype: cast every tensor to it first (float64 "
                        f"for the truth), got {sorted(str(d) for d in dtypes)}")


def _dropout_scale(x2: Tensor, keep: Optional[Tensor], dropout_p: float) -> Optional[Tensor]:
    """D = keep / (1 − q) as (M, K) in x's dtype, or None without dropout."""
    if keep is None:
        return None
    return keep.reshape(x2.shape).to(x2.dtype) / (1.0 - dropout.quantised_p(dropout_p))


def _magnitude_scale(weight, lora_a, lora_b_eff, scaling, magnitude):
    """(c, ‖W + s·B_eff·A‖_row), the norm detached."""
    norm = row_norm(weight, lora_a, lora_b_eff, scaling).detach()
    return magnitude / norm, norm


def forward(x: Tensor, weight: Tensor, lora_a: Tensor, lora_b: Tensor, *,
            bias: Optional[Tensor] = None, latent: Optional[Tensor] = None, scaling: float = 1.0,
            magnitude: Optional[Tensor] = None, keep: Optional[Tensor] = None,
            dropout_p: float = 0.0) -> tuple[Tensor, Tensor]:
    """(y, P): y (..., N) and P = x̃·Aᵀ (M, r), by the formulas of the module docstring."""
    _one_dtype(x, weight, lora_a, lora_b, bias, latent, magnitude)
    x2 = x.reshape(-1, x.shape[-1])
    d = _dropout_scale(x2, keep, dropout_p)
    x_tilde = x2 if d is None else d * x2
    b_eff = lora_b if latent is None else lora_b @ latent.T
    p = x_tilde @ lora_a.T
    low_rank = scaling * (p @ b_eff.T)
    if magnitude is None:
        y = x2 @ weight.T + low_rank
    else:
        c, _ = _magnitude_scale(weight, lora_a, b_eff, scaling, magnitude)
        y = x2 @ weight.T + (c - 1) * (x_tilde @ weight.T) + c * low_rank
    if bias is not None:
        y = y + bias
    return y.reshape(*x.shape[:-1], weight.shape[0]), p


def backward(grad_y: Tensor, x: Tensor, weight: Tensor, lora_a: Tensor, lora_b: Tensor, *,
             bias: Optional[Tensor] = None, latent: Optional[Tensor] = None, scaling: float = 1.0,
             magnitude: Optional[Tensor] = None, keep: Optional[Tensor] = None,
             dropout_p: float = 0.0) -> Gradients:
    """Every gradient for ``grad_y`` = ∂L/∂y (y's shape), by the formulas of the module
    docstring; the arguments are ``forward``'s."""
    _one_dtype(grad_y, x, weight, lora_a, lora_b, bias, latent, magnitude)
    s = scaling
    x2 = x.reshape(-1, x.shape[-1])
    g = grad_y.reshape(-1, weight.shape[0])
    d = _dropout_scale(x2, keep, dropout_p)
    x_tilde = x2 if d is None else d * x2
    r = lora_a.shape[0]
    latent_ = torch.eye(r, dtype=x.dtype, device=x.device) if latent is None else latent
    b_eff = lora_b @ latent_.T
    p = x_tilde @ lora_a.T

    g_c = g  # c ⊙ G
    if magnitude is not None:
        c, norm = _magnitude_scale(weight, lora_a, b_eff, s, magnitude)
        g_c = c * g
    t = s * (g_c @ lora_b)
    dp = t @ latent_.T
    dr = p.T @ t if latent is not None else None
    db = s * (g_c.T @ (p @ latent_))
    da = dp.T @ x_tilde
    dx_tilde = dp @ lora_a
    dw = g.T @ x2
    if magnitude is not None:
        dx_tilde = dx_tilde + ((c - 1) * g) @ weight
        dw = dw + ((c - 1) * g).T @ x_tilde
    dx = g @ weight + (dx_tilde if d is None else d * dx_tilde)
    dbias = g.sum(0) if bias is not None else None
    dm = None
    if magnitude is not None:
        dm = (g * (x_tilde @ weight.T + s * (p @ b_eff.T))).sum(0) / norm
    return Gradients(dx=dx.reshape(x.shape), dw=dw, da=da, db=db, dr=dr, dbias=dbias, dm=dm)
