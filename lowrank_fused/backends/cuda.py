"""CUDA backend: the reference contract (see ``reference``) on the compiled extension
lowrank_fused._C (csrc/) for the rank-r passes and cuBLAS (through ATen) for the GEMMs."""
from __future__ import annotations

import torch

from .. import _C  # noqa: F401  (registers torch.ops.lowrank_fused_C)
from ._gpu_common import check_dtypes, seed_and_p

_ops = torch.ops.lowrank_fused_C


def _stream(device) -> int:
    return torch.cuda.current_stream(device).cuda_stream


def dropout_keep_mask(dropout, shape, device):
    with torch.cuda.device(device):
        return _ops.keep_mask(torch.empty(0, device=device), shape[0], shape[1], dropout.seed,
                              dropout.p, _stream(device))


def forward(x, weight, bias, lora_a, lora_b_eff, scaling, dropout):
    check_dtypes("cuda", x, lora_a)
    seed, p_drop = seed_and_p(dropout)
    with torch.cuda.device(x.device):
        p = _ops.skinny_projection(x, lora_a, 1.0, seed, p_drop, lora_a.dtype, _stream(x.device))
        y = torch.nn.functional.linear(x, weight, bias)
        # low-rank term accumulated into y by a second cuBLAS call (beta = 1): no M x N temporary
        y.addmm_(p.to(x.dtype), lora_b_eff.T.to(x.dtype), alpha=scaling)
    return y, p


def backward(grad_y, x, p, weight, lora_a, lora_b_eff, scaling, dropout, *,
             need_x, need_a, need_b, need_bias):
    seed, p_drop = seed_and_p(dropout)
    dx = da = db_eff = dbias = None
    with torch.cuda.device(grad_y.device):
        stream = _stream(grad_y.device)
        dp = None
        if need_x or need_a:  # dP = s·G·B_eff, one read of G
            dp = _ops.skinny_projection(grad_y, lora_b_eff.T, scaling, 0, 0.0, torch.float32,
                                        stream)
        if need_x:
            dx = grad_y @ weight
            if dropout is None:
                dx.addmm_(dp.to(dx.dtype), lora_a.to(dx.dtype))
            else:
                low_rank = (dp @ lora_a.float()).to(dx.dtype).contiguous()
                _ops.dropout_(low_rank, seed, p_drop, stream)
                dx += low_rank
        if need_a:
            x_lr = x.contiguous()
            if dropout is not None:
                x_lr = x_lr.clone()
                _ops.dropout_(x_lr, seed, p_drop, stream)
            da = (dp.T.to(x_lr.dtype) @ x_lr).to(lora_a.dtype)
        if need_b:
            db_eff = (scaling * (grad_y.T @ p.to(grad_y.dtype)).float()).to(lora_b_eff.dtype)
        if need_bias:
            dbias = grad_y.sum(0)
    return dx, da, db_eff, dbias
