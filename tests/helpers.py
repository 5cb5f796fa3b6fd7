"""Shared test helpers: the naive composition the operator must equal, and case builders."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from lowrank_fused.backends import pytorch as reference
from lowrank_fused.dropout import DropoutSpec, quantised_p

# Which operator inputs train, per case; x's own flag is set separately.
TRAINABLE = {
    "lora": {"lora_a", "lora_b"},
    "lora+latent": {"lora_a", "lora_b", "latent"},
    "lora_fa": {"lora_b"},
    "lora_fa+latent": {"lora_b", "latent"},
    "lora_xs": {"latent"},
    "everything": {"weight", "bias", "lora_a", "lora_b", "latent"},
}


@dataclass
class Case:
    x: torch.Tensor
    weight: torch.Tensor
    lora_a: torch.Tensor
    lora_b: torch.Tensor
    bias: Optional[torch.Tensor]
    latent: Optional[torch.Tensor]
    scaling: float

    def tensors(self) -> dict:
        named = dict(x=self.x, weight=self.weight, lora_a=self.lora_a, lora_b=self.lora_b,
                     bias=self.bias, latent=self.latent)
        return {k: v for k, v in named.items() if v is not None}


def make_case(m_shape, k, n, r, *, trainable=TRAINABLE["lora"], bias=True, latent=False,
              dtype=torch.float64, adapter_dtype=None, x_grad=True, seed=0, device="cpu",
              scaling=0.5) -> Case:
    g = torch.Generator().manual_seed(seed)
    adapter_dtype = adapter_dtype or dtype

    def t(*shape, dt, name, scale=1.0):
        v = (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(dt).to(device)
        return v.requires_grad_(name in trainable or (name == "x" and x_grad))

    return Case(
        x=t(*m_shape, k, dt=dtype, name="x"),
        weight=t(n, k, dt=dtype, name="weight", scale=k ** -0.5),
        lora_a=t(r, k, dt=adapter_dtype, name="lora_a", scale=k ** -0.5),
        # B is non-zero so every gradient path is exercised
        lora_b=t(n, r, dt=adapter_dtype, name="lora_b", scale=r ** -0.5),
        bias=t(n, dt=dtype, name="bias") if bias else None,
        latent=t(r, r, dt=adapter_dtype, name="latent", scale=r ** -0.5) if latent else None,
        scaling=scaling,
    )


def naive_forward(case: Case, keep_mask=None, p: float = 0.0) -> torch.Tensor:
    """Plain torch composition: y = x Wᵀ + b + s·dropout(x) Aᵀ R Bᵀ."""
    x = case.x
    x_lr = x if keep_mask is None else x * keep_mask / (1.0 - quantised_p(p))
    p_act = x_lr.to(case.lora_a.dtype) @ case.lora_a.T
    if case.latent is not None:
        p_act = p_act @ case.latent
    y = x @ case.weight.T + (case.scaling * (p_act @ case.lora_b.T)).to(x.dtype)
    if case.bias is not None:
        y = y + case.bias
    return y


def as_float64(case: Case) -> Case:
    """The same case with every tensor's values in float64 (same trainable flags, strides of
    x kept only as far as ``double()`` keeps them)."""
    def up(t):
        return None if t is None else t.detach().double().requires_grad_(t.requires_grad)
    return Case(x=up(case.x), weight=up(case.weight), lora_a=up(case.lora_a),
                lora_b=up(case.lora_b), bias=up(case.bias), latent=up(case.latent),
                scaling=case.scaling)


def reference_keep_mask(p: float, seed: int, shape, device="cpu"):
    return reference.dropout_keep_mask(DropoutSpec(p, seed), shape, torch.device(device))


def grads_of(out: torch.Tensor, grad_out: torch.Tensor, tensors: dict) -> dict:
    wanted = {k: v for k, v in tensors.items() if v.requires_grad}
    got = torch.autograd.grad(out, list(wanted.values()), grad_out, allow_unused=True)
    return dict(zip(wanted.keys(), got))
