"""LoRA-XS inside a PEFT model: lora_A = Σ_r·Vᴴ_r and B = U_r from the truncated SVD of W (both
frozen), and a trainable r x r latent R, kept as a parametrization lora_B.weight = B·Rᵀ so every
PEFT code path (forward, merge, unmerge) sees the product.

PEFT's own ``save_pretrained`` works on a LoRA-XS model: a state-dict hook adds
``lora_B.weight`` = B·Rᵀ beside the parametrization's keys, so plain PEFT loads the file with
identical outputs (it ignores the extra keys); our own ``load_state_dict`` drops that derived key.
To go on training LoRA-XS from files, use ``save_lora_xs`` / ``load_lora_xs``.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn
from torch.nn.utils import parametrize

from .. import quantized
from ..initialization import lora_xs_factors, lora_xs_latent
from .lora_layers import is_lora_linear, lora_layers, lora_linear_layers


class _Latent(nn.Module):
    """lora_B.weight = B·Rᵀ with B frozen (the SVD factor) and R trainable (r x r)."""

    def __init__(self, latent: torch.Tensor):
        super().__init__()
        self.latent = nn.Parameter(latent)

    def forward(self, lora_b):
        return lora_b @ self.latent.T


_ORIGINAL = "parametrizations.weight.original"


def _add_product_key(module, state_dict, prefix, local_metadata) -> None:
    # What plain PEFT reads: the product, under PEFT's own key.
    state_dict[prefix + "weight"] = module.weight.detach()


def _drop_product_key(module, state_dict, prefix, *args) -> None:
    # The product is derived from the parametrization's keys: never load it over them.
    if prefix + _ORIGINAL in state_dict:
        state_dict.pop(prefix + "weight", None)


def factor(lora_b: nn.Module) -> nn.Parameter:
    """B (frozen) of a LoRA-XS lora_B module."""
    return lora_b.parametrizations.weight.original


def latent_of(lora_b: nn.Module) -> nn.Parameter:
    """R (trainable) of a LoRA-XS lora_B module."""
    return lora_b.parametrizations.weight[0].latent


def latents(model: nn.Module, adapter: str = "default") -> dict[str, nn.Parameter]:
    """{layer name: R} of the LoRA-XS layers of ``model``."""
    out = {}
    for name, module in lora_linear_layers(model, adapter):
        linear = module.lora_B[adapter]
        if parametrize.is_parametrized(linear, "weight"):
            out[name] = latent_of(linear)
    return out


def _trainable_aux_parameters(model: nn.Module) -> list:
    """Trainable parameters PEFT trains beside the adapters (modules_to_save, e.g. a head)."""
    try:
        from peft.utils.other import AuxiliaryTrainingWrapper as Wrapper
    except ImportError:  # older PEFT
        from peft.utils import ModulesToSaveWrapper as Wrapper
    return [p for m in model.modules() if isinstance(m, Wrapper)
            for p in m.parameters() if p.requires_grad]


@torch.no_grad()
def convert_to_lora_xs(model: nn.Module, adapter: str = "default", *, init: bool = True,
                       generator: Optional[torch.Generator] = None, **xs_options) -> int:
    """Turn a PEFT LoRA model's Linear adapters into LoRA-XS: lora_A = Σ_r·Vᴴ_r and lora_B = U_r
    from the truncated SVD of each base W, plus a latent R ~ N(0, 1e-5²).

    Frozen afterwards: the base model, lora_A, the factor B and every other adapter. Trainable:
    the latents R and whatever PEFT trains beside the adapters (``modules_to_save``, e.g. a
    classifier head), as PEFT itself leaves them. ``init=False`` keeps the current lora_A /
    lora_B (after loading saved factors) and R = 0 until ``load_lora_xs`` fills it.
    ``xs_options``: see ``lora_xs_factors``. Returns the number of latent parameters (L·q·r²)."""
    others = [n for n, m in lora_layers(model)
              if not is_lora_linear(m) and adapter in getattr(m, "lora_A", {})]
    if others:
        raise ValueError(f"LoRA-XS covers Linear layers only; adapter {adapter!r} is also on "
                         f"{others[:5]}: target only Linear modules")
    layers = lora_linear_layers(model, adapter)
    if not layers:
        raise ValueError(f"no PEFT LoRA Linear layer has an adapter named {adapter!r}")
    if any(parametrize.is_parametrized(m.lora_B[adapter], "weight") for _, m in layers):
        raise ValueError(f"adapter {adapter!r} is already LoRA-XS")
    dora = [n for n, m in layers if adapter in getattr(m, "lora_variant", {})]
    if dora:
        raise ValueError(f"adapter {adapter!r} is a LoRA variant (DoRA: use_dora=True) on "
                         f"{dora[:5]}: LoRA-XS converts plain LoRA adapters only")
    keep = _trainable_aux_parameters(model)
    for p in model.parameters():
        p.requires_grad_(False)
    for p in keep:
        p.requires_grad_(True)
    count = 0
    for _, module in layers:
        lora_a, lora_b = module.lora_A[adapter], module.lora_B[adapter]
        rank = lora_a.weight.shape[0]
        if init:
            weight = module.get_base_layer().weight
            if quantized.is_4bit(weight):  # a 4-bit base: its SVD runs on W dequantized once
                weight = quantized.dequantize(weight, weight.quant_state.dtype)
            a, b = lora_xs_factors(weight, rank, generator=generator,
                                   dtype=lora_a.weight.dtype, **xs_options)
            lora_a.weight.copy_(a)
            lora_b.weight.copy_(b)
            latent = lora_xs_latent(rank, generator=generator, device=lora_a.weight.device)
        else:
            latent = torch.zeros(rank, rank, device=lora_a.weight.device)
        with torch.enable_grad():
            parametrize.register_parametrization(
                lora_b, "weight", _Latent(latent.to(lora_a.weight.dtype)), unsafe=True)
        factor(lora_b).requires_grad_(False)
        lora_b._register_state_dict_hook(_add_product_key)
        lora_b._register_load_state_dict_pre_hook(_drop_product_key, with_module=True)
        count += rank * rank
    return count
