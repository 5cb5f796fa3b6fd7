"""HuggingFace PEFT glue: serve PEFT's LoRA Linear layers with the fused operator.

- ``enable_fused(model)``: every ``peft`` LoRA ``Linear`` layer's forward (and so its backward)
  runs through ``low_rank_linear`` on the layer's own tensors (no copies), honouring PEFT's
  scaling (rsLoRA included), lora_dropout, active/disabled and merged adapters. Several active
  adapters share one call, stacked along r. What cannot be served (DoRA and other variants, LoRA
  bias, conv/embedding/quantized layers, mixed batches) runs PEFT's own forward, reported once
  per layer and reason. ``disable()`` undoes it.
- ``freeze_lora_a(model)``: LoRA-FA; x is then never saved for backward.
- ``convert_to_lora_xs(model)``: LoRA-XS inside a PEFT model: A, B from the truncated SVD of W
  (frozen) and a trainable r x r latent R, kept as a parametrization lora_B.weight = B·Rᵀ so
  every PEFT code path (forward, merge, unmerge) sees the product. ``save_lora_xs`` /
  ``load_lora_xs`` write and read PEFT's files plus the latents.
"""
from __future__ import annotations

import json
import types
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch
from torch import nn
from torch.nn.utils import parametrize

from .functional import low_rank_linear
from .initialization import lora_xs_factors, lora_xs_latent

LATENT_FILE = "lora_xs_latent.safetensors"
LATENT_CONFIG = "lora_xs_config.json"


def _lora_linear_class():
    try:
        from peft.tuners.lora import Linear
    except ImportError as err:  # pragma: no cover - peft is a test dependency
        raise ImportError("lowrank_fused.peft needs the peft package: pip install peft") from err
    return Linear


def _lora_layers(model: nn.Module):
    """(name, module) of every PEFT LoRA layer of any kind."""
    from peft.tuners.lora import LoraLayer
    return [(n, m) for n, m in model.named_modules() if isinstance(m, LoraLayer)]


def _static_reason(module) -> Optional[str]:
    """Why this LoRA layer can never be served, or None."""
    if not isinstance(module, _lora_linear_class()):
        return f"{type(module).__name__} layers are not Linear"
    if type(module.get_base_layer()) is not nn.Linear:
        return f"base layer {type(module.get_base_layer()).__name__} is not a plain nn.Linear"
    if getattr(module, "fan_in_fan_out", False):
        return "fan_in_fan_out weights"
    return None


@dataclass
class FusedPeft:
    """What ``enable_fused`` did; ``disable()`` (or leaving a ``with`` block) restores PEFT."""

    served: list[str] = field(default_factory=list)
    fallbacks: dict[str, str] = field(default_factory=dict)
    _modules: list = field(default_factory=list, repr=False)

    def disable(self) -> None:
        for module in self._modules:
            if "forward" in module.__dict__:
                del module.forward
            module.__dict__.pop("_lowrank_fused", None)
        self._modules.clear()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.disable()


def _report_once(module, reason: str) -> None:
    reported = module.__dict__.setdefault("_lowrank_fused_reported", set())
    if reason not in reported:
        reported.add(reason)
        warnings.warn(f"lowrank_fused: {module.__dict__.get('_lowrank_fused_name', 'a layer')} "
                      f"runs PEFT's own forward: {reason}", stacklevel=3)


def _dropout_p(module, adapter: str) -> float:
    dropout = module.lora_dropout[adapter]
    return float(dropout.p) if isinstance(dropout, nn.Dropout) and module.training else 0.0


def _call_reason(module, active) -> Optional[str]:
    variants = getattr(module, "lora_variant", {})
    for adapter in active:
        if adapter in variants:
            return f"adapter {adapter!r} is a {type(variants[adapter]).__name__} variant"
        if module.lora_B[adapter].bias is not None:
            return f"adapter {adapter!r} has a LoRA bias"
    if len({module.lora_A[a].weight.dtype for a in active}) > 1:
        return "active adapters of different dtypes"
    if len(active) > 1 and any(_dropout_p(module, a) > 0 for a in active):
        return "several active adapters with dropout (each draws its own mask)"
    return None


def _fused_forward(self, x, *args, **kwargs):
    peft_forward = type(self).forward
    if args or kwargs or self.disable_adapters or self.merged:
        return peft_forward(self, x, *args, **kwargs)  # PEFT's base-only and mixed-batch paths
    active = [a for a in self.active_adapters if a in self.lora_A]
    if not active:
        return peft_forward(self, x)
    reason = _call_reason(self, active)
    if reason is not None:
        _report_once(self, reason)
        return peft_forward(self, x)

    base = self.get_base_layer()
    backend = self.__dict__["_lowrank_fused"]
    if len(active) == 1:
        (adapter,) = active
        lora_a, lora_b = self.lora_A[adapter].weight, self.lora_B[adapter].weight
        scaling, p = self.scaling[adapter], _dropout_p(self, adapter)
    else:  # one call for all: [A_1; A_2; ...] and [s_1·B_1 | s_2·B_2 | ...]
        lora_a = torch.cat([self.lora_A[a].weight for a in active], 0)
        lora_b = torch.cat([self.lora_B[a].weight * self.scaling[a] for a in active], 1)
        scaling, p = 1.0, 0.0
    return low_rank_linear(x, base.weight, lora_a, lora_b, bias=base.bias, scaling=scaling,
                           dropout_p=p, training=self.training, backend=backend)


def enable_fused(model: nn.Module, backend: str = "auto") -> FusedPeft:
    """Route every PEFT LoRA Linear layer of ``model`` through the fused operator."""
    result = FusedPeft()
    for name, module in _lora_layers(model):
        reason = _static_reason(module)
        if reason is not None:
            result.fallbacks[name] = reason
            warnings.warn(f"lowrank_fused: {name} runs PEFT's own forward: {reason}", stacklevel=2)
            continue
        module.__dict__["_lowrank_fused"] = backend
        module.__dict__["_lowrank_fused_name"] = name
        module.forward = types.MethodType(_fused_forward, module)
        result.served.append(name)
        result._modules.append(module)
    if not result.served and not result.fallbacks:
        raise ValueError("the model has no PEFT LoRA layer")
    return result


def freeze_lora_a(model: nn.Module) -> int:
    """LoRA-FA: freeze every lora_A; returns how many were frozen."""
    count = 0
    for _, module in _lora_layers(model):
        for layer in getattr(module, "lora_A", {}).values():
            layer.weight.requires_grad_(False)
            count += 1
    return count


class _Latent(nn.Module):
    """lora_B.weight = B·Rᵀ with B frozen (the SVD factor) and R trainable (r x r)."""

    def __init__(self, latent: torch.Tensor):
        super().__init__()
        self.latent = nn.Parameter(latent)

    def forward(self, lora_b):
        return lora_b @ self.latent.T


def _lora_xs_modules(model, adapter):
    cls = _lora_linear_class()
    return [(n, m) for n, m in _lora_layers(model) if isinstance(m, cls) and adapter in m.lora_A]


def latents(model: nn.Module, adapter: str = "default") -> dict[str, nn.Parameter]:
    """{layer name: R} of the LoRA-XS layers of ``model``."""
    out = {}
    for name, module in _lora_xs_modules(model, adapter):
        linear = module.lora_B[adapter]
        if parametrize.is_parametrized(linear, "weight"):
            out[name] = linear.parametrizations.weight[0].latent
    return out


@torch.no_grad()
def convert_to_lora_xs(model: nn.Module, adapter: str = "default", *, init: bool = True,
                       generator: Optional[torch.Generator] = None, **xs_options) -> int:
    """Turn a PEFT LoRA model's Linear adapters into LoRA-XS: lora_A = Σ_r·Vᴴ_r and lora_B = U_r
    from the truncated SVD of each base W (frozen), plus a trainable latent R ~ N(0, 1e-5²).
    ``init=False`` keeps the current lora_A / lora_B (after loading saved factors) and R = 0
    until ``load_lora_xs`` fills it. ``xs_options``: see ``lora_xs_factors``. Freezes every
    other parameter; returns the trainable-parameter count (L·q·r²)."""
    others = [n for n, m in _lora_layers(model)
              if not isinstance(m, _lora_linear_class()) and adapter in getattr(m, "lora_A", {})]
    if others:
        raise ValueError(f"LoRA-XS covers Linear layers only; adapter {adapter!r} is also on "
                         f"{others[:5]}: target only Linear modules")
    for p in model.parameters():
        p.requires_grad_(False)
    count = 0
    for _, module in _lora_xs_modules(model, adapter):
        lora_a, lora_b = module.lora_A[adapter], module.lora_B[adapter]
        rank = lora_a.weight.shape[0]
        if parametrize.is_parametrized(lora_b, "weight"):
            raise ValueError("the model is already LoRA-XS")
        if init:
            a, b = lora_xs_factors(module.get_base_layer().weight, rank, generator=generator,
                                   dtype=lora_a.weight.dtype, **xs_options)
            lora_a.weight.copy_(a)
            lora_b.weight.copy_(b)
            latent = lora_xs_latent(rank, generator=generator, device=lora_a.weight.device)
        else:
            latent = torch.zeros(rank, rank, device=lora_a.weight.device)
        with torch.enable_grad():
            parametrize.register_parametrization(
                lora_b, "weight", _Latent(latent.to(lora_a.weight.dtype)), unsafe=True)
        lora_b.parametrizations.weight.original.requires_grad_(False)
        count += rank * rank
    if count == 0:
        raise ValueError(f"no PEFT LoRA Linear layer has an adapter named {adapter!r}")
    return count


def _peft_key(name: str, adapter: str, which: str) -> str:
    # PEFT's file keys drop the adapter name: "<module>.lora_A.weight".
    return f"{name}.{which}.weight"


def save_lora_xs(model, directory, adapter: str = "default") -> None:
    """Write PEFT's files (adapter_config.json, adapter_model.safetensors with PEFT's key names:
    lora_A = Σ_r·Vᴴ_r, lora_B = U_r) plus the latents (lora_xs_latent.safetensors)."""
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    model.peft_config[adapter].save_pretrained(str(directory))
    factors, latent_tensors = {}, {}
    for name, module in _lora_xs_modules(model, adapter):
        lora_b = module.lora_B[adapter]
        if not parametrize.is_parametrized(lora_b, "weight"):
            raise ValueError(f"{name} is not LoRA-XS: call convert_to_lora_xs first")
        factors[_peft_key(name, adapter, "lora_A")] = module.lora_A[adapter].weight.detach().contiguous()
        factors[_peft_key(name, adapter, "lora_B")] = lora_b.parametrizations.weight.original.detach().contiguous()
        latent_tensors[name] = lora_b.parametrizations.weight[0].latent.detach().contiguous()
    save_file(factors, str(directory / "adapter_model.safetensors"))
    save_file(latent_tensors, str(directory / LATENT_FILE))
    (directory / LATENT_CONFIG).write_text(json.dumps({"method": "lora_xs", "adapter": adapter}))


def load_lora_xs(base_model: nn.Module, directory, *, is_trainable: bool = False):
    """The PEFT model saved by ``save_lora_xs``: PEFT loads A and B, then the latents."""
    from peft import PeftModel
    from safetensors.torch import load_file

    directory = Path(directory)
    model = PeftModel.from_pretrained(base_model, str(directory), is_trainable=is_trainable)
    adapter = json.loads((directory / LATENT_CONFIG).read_text())["adapter"]
    convert_to_lora_xs(model, adapter, init=False)
    saved = load_file(str(directory / LATENT_FILE))
    current = latents(model, adapter)
    if set(saved) != set(current):
        raise ValueError(f"latents in {directory} do not match the model's LoRA layers: "
                         f"{sorted(set(saved) ^ set(current))[:5]}")
    with torch.no_grad():
        for name, latent in current.items():
            latent.copy_(saved[name])
            latent.requires_grad_(is_trainable)
    return model
