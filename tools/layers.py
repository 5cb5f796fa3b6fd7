"""The layers the suites compare, all built over the same frozen base weight.

- "linear": the bare frozen nn.Linear (the floor every ratio is taken against);
- "naive": an unfused PyTorch composition, x·Wᵀ + b + s·(x·Aᵀ)·R·Bᵀ as separate ops;
- "peft": PEFT's LoRA layer (lora_A/lora_B as nn.Linear), when the peft package is installed;
- "reference", "triton", "cuda": LowRankLinear on that backend of ours (named as ``backend=``
  names it; "reference" is our plain-PyTorch backend, not the unfused "naive" composition).
The LLaMA-style stack in test_memory.py names its contenders "ours-<method>" instead: there the
method varies and the backend is "auto".
"""
from __future__ import annotations

import copy
import importlib.util

import torch
from torch import nn

from lowrank_fused import LowRankLinear, available_backends
from lowrank_fused.saved_activations import SavedActivations

METHODS = ("lora", "lora_fa", "lora_xs")


def peft_available() -> bool:
    return importlib.util.find_spec("peft") is not None


def our_backends(device: torch.device) -> list[str]:
    if device.type == "cuda":
        return [b for b in available_backends() if b != "reference"] + ["reference"]
    return ["reference"]


def implementations(device: torch.device) -> list[str]:
    names = ["linear", "naive"] + (["peft"] if peft_available() else [])
    return names + our_backends(device)


class NaiveLowRank(nn.Module):
    """The unfused composition: what a user writes by hand (and what PEFT does, minus PEFT)."""

    def __init__(self, base: nn.Linear, rank: int, method: str):
        super().__init__()
        self.base = base
        n, k = base.weight.shape
        factory = dict(device=base.weight.device, dtype=torch.float32)
        self.lora_a = nn.Parameter(torch.randn(rank, k, **factory) / k ** 0.5,
                                   requires_grad=method == "lora")
        self.lora_b = nn.Parameter(torch.randn(n, rank, **factory) * 0.01,
                                   requires_grad=method != "lora_xs")
        # R random too: no timed product runs on zeros
        self.latent = (nn.Parameter(torch.randn(rank, rank, **factory) * 0.01)
                       if method == "lora_xs" else None)

    def forward(self, x):
        p = x.to(self.lora_a.dtype) @ self.lora_a.T
        if self.latent is not None:
            p = p @ self.latent
        return self.base(x) + (p @ self.lora_b.T).to(x.dtype)


class Holder(nn.Module):
    """One Linear under the name PEFT targets (``proj``)."""

    def __init__(self, base):
        super().__init__()
        self.proj = base

    def forward(self, x):
        return self.proj(x)


def peft_layer(base: nn.Linear, rank: int, method: str) -> nn.Module:
    """PEFT's LoRA on one Linear, lora_B random (PEFT's zero init would time products of
    zeros); LoRA-FA freezes every lora_A (PEFT has no LoRA-XS: same rank LoRA stands in)."""
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(Holder(base), LoraConfig(r=rank, lora_alpha=rank,
                                                     target_modules=["proj"]))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.01)
            if "lora_A" in name and method == "lora_fa":
                param.requires_grad_(False)
    return model


def build(impl: str, k: int, n: int, rank: int, method: str, dtype, device) -> nn.Module:
    torch.manual_seed(0)
    base = nn.Linear(k, n, device=device, dtype=dtype)
    base.requires_grad_(False)
    if impl == "linear":
        return base
    if impl == "naive":
        return NaiveLowRank(base, rank, method)
    if impl == "peft":
        return peft_layer(copy.deepcopy(base), rank, method)
    if impl not in our_backends(device):
        raise ValueError(f"unknown implementation {impl!r}: expected one of "
                         f"{implementations(device)}")
    layer = LowRankLinear.from_linear(base, rank, method, backend=impl)
    with torch.no_grad():
        layer.lora_b.normal_(0, 0.01)
    return layer


def saved_activation_bytes(module: nn.Module, x: torch.Tensor) -> int:
    """Bytes autograd keeps for backward of module(x), parameters excluded (x counts when kept)."""
    with SavedActivations(module) as saved:
        module(x)
    return saved.nbytes
