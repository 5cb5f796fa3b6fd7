"""Finding PEFT's LoRA layers in a model (shared by serving, LoRA-FA and LoRA-XS)."""
from __future__ import annotations

from torch import nn

try:
    from peft.tuners.lora import Linear as LoraLinear
    from peft.tuners.lora import LoraLayer
except ImportError as err:  # pragma: no cover - peft is an optional dependency
    raise ImportError("lowrank_fused.peft needs the peft package: pip install peft") from err


def lora_layers(model: nn.Module) -> list:
    """(name, module) of every PEFT LoRA layer of any kind."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, LoraLayer)]


def lora_linear_layers(model: nn.Module, adapter: str) -> list:
    """(name, module) of the PEFT LoRA Linear layers that hold ``adapter``."""
    return [(n, m) for n, m in lora_layers(model)
            if isinstance(m, LoraLinear) and adapter in m.lora_A]
