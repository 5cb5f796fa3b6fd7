"""Why a PEFT LoRA layer, or one call of it, cannot run the fused operator.

Two kinds of reason, both plain strings that name what is in the way:

- ``static_reason(module)``: the layer itself (its class, its base layer, fan_in_fan_out, a
  4-bit base without a quant state): it never runs the operator.
- ``call_reason(module, active)``: the adapters a call would use (a LoRA bias, a variant other
  than DoRA, DoRA over several adapters, mixed dtypes, several adapters with dropout, ...).
  The config decides these, so ``enable_fused`` finds them before any call; a later change
  (``set_adapter``, ``add_adapter``, ``train()``) can make them appear or go away, so a served
  layer checks again at every call.
"""
from __future__ import annotations

from typing import Optional

from torch import nn

from .lora_layers import LoraLinear, is_bnb_linear4bit, lora_linear4bit_class

# bitsandbytes' 4-bit layer classes whose forward a served layer reproduces (subclasses may
# change it)
_BNB_4BIT_CLASSES = ("Linear4bit", "LinearNF4", "LinearFP4")


def peft_class(module) -> type:
    """The PEFT class of a LoRA layer, served (its ``_peft_class``) or not."""
    cls = type(module)
    return cls._peft_class if getattr(cls, "_lowrank_fused_served", False) else cls


def active_adapters(module) -> list:
    """The active adapters this layer holds (PEFT's rule: others are skipped)."""
    return [a for a in module.active_adapters if a in module.lora_A]


def dropout_p(module, adapter: str) -> float:
    """PEFT's own rule: the lora_dropout module's training flag decides, not the layer's."""
    dropout = module.lora_dropout[adapter]
    return float(dropout.p) if isinstance(dropout, nn.Dropout) and dropout.training else 0.0


def _configured_dropout_p(module, adapter: str) -> float:
    dropout = module.lora_dropout[adapter]
    return float(dropout.p) if isinstance(dropout, nn.Dropout) else 0.0


def is_dora(module, adapter: str) -> bool:
    """Whether ``adapter`` of this layer is PEFT's DoRA on a Linear (DoraLinearVariant)."""
    variant = getattr(module, "lora_variant", {}).get(adapter)
    cls = _dora_variant_class()
    return variant is not None and cls is not None and (variant is cls or type(variant) is cls)


def _dora_variant_class():
    try:
        from peft.tuners.lora.variants import DoraLinearVariant
    except ImportError:  # an older PEFT: no variant registry
        return None
    return DoraLinearVariant


def _four_bit_base_reason(base) -> Optional[str]:
    """Why a bitsandbytes 4-bit base layer cannot be served, or None."""
    if type(base).__name__ not in _BNB_4BIT_CLASSES or \
            not type(base).__module__.startswith("bitsandbytes"):
        return f"base layer {type(base).__name__} is not a bitsandbytes Linear4bit"
    # a weight that lost its quant state (sharded by FSDP) gets it back from the module, in
    # bitsandbytes' forward and in ours
    if getattr(base.weight, "quant_state", None) is None and \
            getattr(base, "quant_state", None) is None:
        return "its 4-bit base weight has no quant_state yet (move the model to its device)"
    return None


def static_reason(module) -> Optional[str]:
    """Why this LoRA layer can never be served, or None."""
    cls = peft_class(module)
    if cls.__name__ == "Linear8bitLt" and cls.__module__.startswith("peft."):
        return ("base layer bitsandbytes Linear8bitLt (8-bit, LLM.int8()) is not served: its "
                "outlier decomposition and int8 matmul are not reproduced by this package; "
                "only 4-bit (Linear4bit, NF4/FP4) bases are")
    four_bit = lora_linear4bit_class()
    if four_bit is not None and issubclass(cls, four_bit):
        if cls is not four_bit:
            return f"{cls.__name__} is a custom subclass of PEFT's LoRA Linear4bit"
        return _four_bit_base_reason(module.get_base_layer())
    if not issubclass(cls, LoraLinear):
        return f"{cls.__name__} layers are not Linear"
    if cls is not LoraLinear:
        return f"{cls.__name__} is a custom subclass of PEFT's LoRA Linear"
    base = module.get_base_layer()
    if is_bnb_linear4bit(base):  # PEFT's plain Linear over a 4-bit base: served as its 4-bit
        return _four_bit_base_reason(base)
    if type(base) is not nn.Linear:
        return f"base layer {type(base).__name__} is not a plain nn.Linear"
    if getattr(module, "fan_in_fan_out", False):
        return "fan_in_fan_out weights"
    return None


def _dora_reason(module, active, training_only: bool) -> Optional[str]:
    """Why a DoRA call cannot be served, or None: one active adapter over a dense nn.Linear or
    a bitsandbytes 4-bit base, the magnitude in the adapters' dtype."""
    if len(active) > 1:
        return "several active adapters with DoRA"
    (adapter,) = active
    base = module.get_base_layer()
    if type(base) is not nn.Linear and not is_bnb_linear4bit(base):  # QDoRA is served
        return f"DoRA over a {type(base).__name__} base layer"
    magnitude = module.lora_magnitude_vector[adapter].weight
    if magnitude.dtype != module.lora_A[adapter].weight.dtype:
        return "a DoRA magnitude of another dtype than its adapters"
    p = _configured_dropout_p(module, adapter) if training_only else (
        dropout_p(module, adapter) if module.training else 0.0)
    if p >= 1.0:
        return "DoRA with lora_dropout=1.0 (in training)"
    return None


def call_reason(module, active, training_only: bool = False) -> Optional[str]:
    """Why a call of this layer over the ``active`` adapters cannot be served, or None.

    ``training_only``: also name what would only stop a call in training (``enable_fused``
    asks so: a model enabled in eval mode usually trains next)."""
    variants = getattr(module, "lora_variant", {})
    dora = False
    for adapter in active:
        if adapter in variants and is_dora(module, adapter):
            dora = True
        elif adapter in variants:
            return f"adapter {adapter!r} is a {type(variants[adapter]).__name__}"
        if module.lora_B[adapter].bias is not None:
            return f"adapter {adapter!r} has a LoRA bias"
    if dora:
        reason = _dora_reason(module, active, training_only)
        if reason is not None:
            return reason
    if len({module.lora_A[a].weight.dtype for a in active}) > 1:
        return "active adapters of different dtypes"
    rate = _configured_dropout_p if training_only else dropout_p
    if len(active) > 1 and any(rate(module, a) > 0 for a in active):
        return "several active adapters with dropout (each draws its own mask in training)"
    return None


def layer_reason(module) -> Optional[str]:
    """What ``enable_fused`` reports for a layer: its static reason, else the reason its
    active adapters give now (training included), else None."""
    return static_reason(module) or call_reason(module, active_adapters(module),
                                                training_only=True)
