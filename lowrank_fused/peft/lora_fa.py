"""LoRA-FA inside a PEFT model: lora_A frozen, so x is never saved for backward.

The frozen state is registered with PEFT itself (``frozen_peft_weight_names``, the list PEFT
re-applies after ``set_adapter``, ``add_adapter``/``load_adapter`` (which re-mark trainable
parameters), ``delete_adapter`` and ``enable_adapter_layers``), so no PEFT adapter operation
turns LoRA-FA back into LoRA.

With PEFT's own LoRA-FA optimizer: ``peft.optimizers.create_lorafa_optimizer`` also freezes
lora_A and adds LoRA-FA's projected gradient for B; it composes with ``freeze_lora_a`` and
``enable_fused`` (call ``freeze_lora_a`` first so the freeze outlives PEFT's adapter operations;
the optimizer only changes B's update, the fused layer only changes how y and dB are computed).
"""
from __future__ import annotations

import warnings
from typing import Optional, Sequence

from torch import nn

from .lora_layers import lora_layers


def freeze_lora_a(model: nn.Module, adapters: Optional[Sequence[str]] = None) -> int:
    """LoRA-FA: freeze lora_A of ``adapters`` (default: every adapter present now), for good.

    Returns how many lora_A weights were frozen."""
    count = 0
    for _, module in lora_layers(model):
        names = [a for a in getattr(module, "lora_A", {}) if adapters is None or a in adapters]
        if not names:
            continue
        count += len(names)
        if not hasattr(module, "_freeze_non_trainable_peft_weights"):
            # An older PEFT without the list: freeze now; its adapter operations may undo it.
            for adapter in names:
                module.lora_A[adapter].weight.requires_grad_(False)
            _warn_not_lasting()
            continue
        frozen = dict(module.frozen_peft_weight_names)  # the class-level default stays empty
        for adapter in names:
            if "lora_A" not in frozen.get(adapter, ()):
                frozen[adapter] = tuple(frozen.get(adapter, ())) + ("lora_A",)
        module.frozen_peft_weight_names = frozen
        module._freeze_non_trainable_peft_weights(names)
    return count


def _warn_not_lasting() -> None:
    warnings.warn("lowrank_fused: this PEFT has no frozen_peft_weight_names (PEFT 0.21 has): "
                  "lora_A is frozen now, but set_adapter/add_adapter may make it trainable again",
                  stacklevel=3)
