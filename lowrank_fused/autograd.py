"""The one autograd Function of the operator. What it saves follows what needs a gradient.

x is kept only when a gradient needs it (lora_a's, or weight's if the caller unfroze it);
with lora_a frozen (LoRA-FA, LoRA-XS) only P = dropout(x)·Aᵀ (M x r) and a dropout seed are kept.
LoRA-XS's latent R is folded into B_eff = B·Rᵀ, so every backend sees one low-rank shape.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .dropout import DropoutSpec


def effective_lora_b(lora_b: Tensor, latent: Optional[Tensor]) -> Tensor:
    """B_eff = B·Rᵀ (N x r) when a latent R is present, else B."""
    return lora_b if latent is None else lora_b @ latent.T


class LowRankLinearFunction(torch.autograd.Function):
    """y = x Wᵀ + bias + s·dropout(x)·Aᵀ·B_effᵀ on 2-D x; see ``lowrank_fused.low_rank_linear``."""

    @staticmethod
    def forward(ctx, x, weight, bias, lora_a, lora_b, latent, scaling: float,
                dropout: Optional[DropoutSpec], backend):
        lora_b_eff = effective_lora_b(lora_b, latent)
        y, p = backend.forward(x, weight, bias, lora_a, lora_b_eff, scaling, dropout)

        need_x, need_w, _, need_a, need_b, need_r = ctx.needs_input_grad[:6]
        keep_x = need_a or need_w
        keep_p = need_b or need_r
        ctx.save_for_backward(
            x if keep_x else None,
            p if keep_p else None,
            weight,  # parameters cost no activation memory
            lora_a,
            lora_b,
            latent,
        )
        ctx.scaling = scaling
        ctx.dropout = dropout
        ctx.backend = backend
        return y

    @staticmethod
    def backward(ctx, grad_y):
        x, p, weight, lora_a, lora_b, latent = ctx.saved_tensors
        need_x, need_w, need_bias, need_a, need_b, need_r = ctx.needs_input_grad[:6]
        lora_b_eff = effective_lora_b(lora_b, latent)
        grad_y = grad_y.contiguous()

        dx, da, db_eff, dbias = ctx.backend.backward(
            grad_y, x, p, weight, lora_a, lora_b_eff, ctx.scaling, ctx.dropout,
            need_x=need_x, need_a=need_a, need_b=need_b or need_r, need_bias=need_bias,
        )
        # W is frozen by design; if a caller unfroze it, its gradient is one plain GEMM.
        dw = (grad_y.T @ x).to(x.dtype) if need_w else None
        db = dr = None
        if latent is None:
            db = db_eff
        else:
            if need_b:
                db = db_eff @ latent
            if need_r:
                dr = db_eff.T @ lora_b
        return dx, dw, dbias, da, db, dr, None, None, None
