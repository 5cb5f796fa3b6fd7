"""Finding PEFT's LoRA layers in a model (shared by serving, LoRA-FA and LoRA-XS)."""
from __future__ import annotations

import sys

from torch import nn

try:
    from peft.tuners.lora import Linear as LoraLinear
    from peft.tuners.lora import LoraLayer
except ImportError as err:  # pragma: no cover - peft is an optional dependency
    raise ImportError("lowrank_fused.peft needs the peft package: pip install peft") from err


def lora_linear4bit_class():
    """PEFT's LoRA layer over a bitsandbytes 4-bit base (``peft.tuners.lora.bnb.Linear4bit``),
    or None when bitsandbytes (or that PEFT class) is not installed."""
    try:
        from peft.tuners.lora import bnb as peft_bnb
    except ImportError:
        return None
    return getattr(peft_bnb, "Linear4bit", None)


def is_bnb_linear4bit(module) -> bool:
    """Whether ``module`` is a bitsandbytes 4-bit Linear (or a subclass), without importing
    bitsandbytes: a module of that class exists only once bitsandbytes is imported."""
    bnb_nn = sys.modules.get("bitsandbytes.nn")
    cls = getattr(bnb_nn, "Linear4bit", None) if bnb_nn is not None else None
    return cls is not None and isinstance(module, cls)


def is_lora_linear(module) -> bool:
    """A PEFT LoRA Linear layer: over a plain nn.Linear, or over a bitsandbytes 4-bit base."""
    if isinstance(module, LoraLinear):
        return True
    four_bit = lora_linear4bit_class() if isinstance(module, LoraLayer) else None
    return four_bit is not None and isinstance(module, four_bit)


def lora_layers(model: nn.Module) -> list:
    """(name, module) of every PEFT LoRA layer of any kind."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, LoraLayer)]


def lora_linear_layers(model: nn.Module, adapter: str) -> list:
    """(name, module) of the PEFT LoRA Linear layers (4-bit bases included) that hold
    ``adapter``."""
    return [(n, m) for n, m in lora_layers(model)
            if is_lora_linear(m) and adapter in m.lora_A]
