"""Shared test helpers: case builders, and the spec (lowrank_fused.spec) as the one oracle."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from lowrank_fused import spec
from lowrank_fused.dropout import quantised_p

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
    """PyTorch's low-precision run of the operator's math in the dtypes the backends keep (the
    low-rank branch in the adapters' dtype, added in x's): y = x Wᵀ + b + s·dropout(x) Aᵀ R Bᵀ.
    A ``torch_low`` of the tolerance rule; the truth is ``spec_results``."""
    x = case.x
    x_lr = x if keep_mask is None else x * keep_mask / (1.0 - quantised_p(p))
    p_act = x_lr.to(case.lora_a.dtype) @ case.lora_a.T
    if case.latent is not None:
        p_act = p_act @ case.latent
    y = x @ case.weight.T + (case.scaling * (p_act @ case.lora_b.T)).to(x.dtype)
    if case.bias is not None:
        y = y + case.bias
    return y


def grads_of(out: torch.Tensor, grad_out: torch.Tensor, tensors: dict) -> dict:
    wanted = {k: v for k, v in tensors.items() if v.requires_grad}
    got = torch.autograd.grad(out, list(wanted.values()), grad_out, allow_unused=True)
    return dict(zip(wanted.keys(), got))


def grad_output(shape, dtype: torch.dtype) -> torch.Tensor:
    """The tests' ∂L/∂y: fixed values (seed 3) rounded to ``dtype``, on the CPU (callers move
    it: ``.to(y)``), so a backend's run and the spec's see the same values."""
    return torch.randn(shape, generator=torch.Generator().manual_seed(3),
                       dtype=torch.float32).to(dtype)


SPEC_GRADIENT = dict(x="dx", weight="dw", lora_a="da", lora_b="db", latent="dr", bias="dbias",
                     magnitude="dm")


def spec_results(tensors: dict, grad_y: Optional[torch.Tensor] = None, *, scaling: float,
                 p: float = 0.0, seed: Optional[int] = None,
                 dtype: torch.dtype = torch.float64) -> dict:
    """The spec's y (key "y") and the gradient of each tensor that requires grad (keyed by its
    name) for ``grad_y``, from ``tensors`` (x, weight, lora_a, lora_b, and bias, latent,
    magnitude where present; a 4-bit weight dequantized by the caller) cast to ``dtype``: in
    float64, the truth every backend is held to. The keep-mask is the project's for ``seed``."""
    t = {name: v.detach().to(dtype) for name, v in tensors.items() if v is not None}
    keep = spec.keep_mask(t["x"].shape, seed, p, t["x"].device) if p else None
    kwargs = dict(bias=t.get("bias"), latent=t.get("latent"), magnitude=t.get("magnitude"),
                  scaling=scaling, keep=keep, dropout_p=p)
    operands = (t["x"], t["weight"], t["lora_a"], t["lora_b"])
    y, _ = spec.forward(*operands, **kwargs)
    out = {"y": y}
    trainable = [name for name, v in tensors.items() if v is not None and v.requires_grad]
    if trainable and grad_y is not None:
        grads = spec.backward(grad_y.to(y), *operands, **kwargs)
        out.update({name: getattr(grads, SPEC_GRADIENT[name]) for name in trainable})
    return out


def case_spec_results(case: Case, grad_y=None, p: float = 0.0, seed: Optional[int] = None,
                      dtype: torch.dtype = torch.float64) -> dict:
    """``spec_results`` for a ``Case``."""
    return spec_results(case.tensors(), grad_y, scaling=case.scaling, p=p, seed=seed, dtype=dtype)


def case_spec_magnitudes(case: Case, grad_y=None, p: float = 0.0,
                         seed: Optional[int] = None) -> dict:
    """The spec in float64 on every tensor's absolute value (and |dL/dy|): the size of the terms
    each output sums, the scale of its rounding errors where the sum cancels
    (tolerance.assert_kernel_close's ``magnitude``)."""
    def absolute(t):
        return None if t is None else t.detach().abs().requires_grad_(t.requires_grad)
    tensors = {name: absolute(t) for name, t in case.tensors().items()}
    return spec_results(tensors, None if grad_y is None else grad_y.abs(),
                        scaling=abs(case.scaling), p=p, seed=seed)
