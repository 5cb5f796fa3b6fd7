"""Serve PEFT's LoRA Linear layers with the fused operator.

Mechanism: a served layer's ``__class__`` becomes ``FusedLoraLinear``, a subclass of
``peft.tuners.lora.Linear`` that overrides only ``forward``; the model it was enabled on gets a
forward pre-hook (a module-level function) that serves, or reports, LoRA layers created later.
Why this and not the alternatives:

- Nothing is stored per instance but plain data, so pickling, ``copy.deepcopy`` and
  ``torch.save``/``torch.load`` give a served model back (a bound method on the instance, as
  before, does not unpickle).
- ``LoraConfig._register_custom_module`` only acts when PEFT builds layers from that one config:
  ``add_adapter``/``load_adapter`` with a new config, ``from_pretrained`` (the config comes from
  disk) and ``inject_adapter_in_model`` would all build plain layers again. The pre-hook finds
  those at the next forward, whatever created them.
- State dicts, ``save_pretrained`` and PEFT's own ``isinstance`` checks see a
  ``peft.tuners.lora.Linear``; ``disable_fused`` swaps the class back (do so before pickling
  for a model that unpickles without lowrank_fused installed).

A PEFT QLoRA layer (``peft.tuners.lora.bnb.Linear4bit``, over a bitsandbytes ``Linear4bit``)
is served the same way by ``FusedLoraLinear4bit`` (in ``qlora.py``, importable only with
bitsandbytes): x is cast to the base's compute dtype as bitsandbytes does, the 4-bit weight goes
to the operator as it is (dequantized per call, never saved), y comes back in x's dtype.

PEFT's DoRA (``use_dora=True``) on a Linear over a plain nn.Linear or a 4-bit base (QDoRA), one
active adapter, is served by the operator's ``magnitude=`` (dispatch.select: the Triton
backend on CUDA tensors, the reference path on the CPU and for QDoRA).

What cannot be served (DoRA with several active adapters, other
variants, LoRA bias, conv/embedding/8-bit layers,
``fan_in_fan_out``, mixed-adapter batches, several active adapters with dropout) runs PEFT's own
forward and is reported once per layer and reason.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import nn

from .. import quantized
from ..functional import low_rank_linear
from .lora_layers import LoraLayer, LoraLinear, lora_layers, lora_linear4bit_class

_BACKEND = "_lowrank_fused_backend"  # on the enabled root: the backend new layers get
_NAME = "_lowrank_fused_name"
_REPORTED = "_lowrank_fused_reported"
_UNSERVABLE = "_lowrank_fused_unservable"  # on a layer: why it can never be served


def _dropout_p(module, adapter: str) -> float:
    """PEFT's own rule: the lora_dropout module's training flag decides, not the layer's."""
    dropout = module.lora_dropout[adapter]
    return float(dropout.p) if isinstance(dropout, nn.Dropout) and dropout.training else 0.0


def _is_dora(module, adapter: str) -> bool:
    """Whether ``adapter`` of this layer is PEFT's DoRA on a Linear (DoraLinearVariant)."""
    variant = getattr(module, "lora_variant", {}).get(adapter)
    return variant is not None and _dora_variant_class() is not None and (
        variant is _dora_variant_class() or type(variant) is _dora_variant_class())


def _dora_variant_class():
    try:
        from peft.tuners.lora.variants import DoraLinearVariant
    except ImportError:  # an older PEFT: no variant registry
        return None
    return DoraLinearVariant


def _dora_reason(module, active) -> Optional[str]:
    """Why a DoRA call cannot be served, or None: one active adapter over a dense nn.Linear or
    a bitsandbytes 4-bit base, the magnitude in the adapters' dtype."""
    if len(active) > 1:
        return "several active adapters with DoRA"
    (adapter,) = active
    base = module.get_base_layer()
    if type(base) is not nn.Linear and not quantized.is_linear4bit(base):  # QDoRA is served
        return f"DoRA over a {type(base).__name__} base layer"
    magnitude = module.lora_magnitude_vector[adapter].weight
    if magnitude.dtype != module.lora_A[adapter].weight.dtype:
        return "a DoRA magnitude of another dtype than its adapters"
    if module.training and _dropout_p(module, adapter) >= 1.0:
        return "DoRA with lora_dropout=1.0"
    return None


def _call_reason(module, active) -> Optional[str]:
    variants = getattr(module, "lora_variant", {})
    dora = False
    for adapter in active:
        if adapter in variants and _is_dora(module, adapter):
            dora = True
        elif adapter in variants:
            return f"adapter {adapter!r} is a {type(variants[adapter]).__name__}"
        if module.lora_B[adapter].bias is not None:
            return f"adapter {adapter!r} has a LoRA bias"
    if dora:
        reason = _dora_reason(module, active)
        if reason is not None:
            return reason
    if len({module.lora_A[a].weight.dtype for a in active}) > 1:
        return "active adapters of different dtypes"
    if len(active) > 1 and any(_dropout_p(module, a) > 0 for a in active):
        return "several active adapters with dropout (each draws its own mask)"
    return None


def _report_once(module, reason: str, stacklevel: int = 3) -> None:
    reported = module.__dict__.setdefault(_REPORTED, set())
    if reason not in reported:
        reported.add(reason)
        warnings.warn(f"lowrank_fused: {module.__dict__.get(_NAME, 'a layer')} "
                      f"runs PEFT's own forward: {reason}", stacklevel=stacklevel)


def fused_forward(self, x, peft_forward, base_weight, bias):
    """The served forward of a PEFT LoRA layer ``self`` over ``base_weight`` (dense or 4-bit),
    or PEFT's own (``peft_forward``) where the call cannot be served."""
    if self.disable_adapters or self.merged:
        return peft_forward(x)  # PEFT's base-only path
    active = [a for a in self.active_adapters if a in self.lora_A]
    if not active:
        return peft_forward(x)
    reason = _call_reason(self, active)
    if reason is not None:
        _report_once(self, reason, stacklevel=4)
        return peft_forward(x)

    magnitude = None
    if len(active) == 1:
        (adapter,) = active
        lora_a, lora_b = self.lora_A[adapter].weight, self.lora_B[adapter].weight
        scaling, p = self.scaling[adapter], _dropout_p(self, adapter)
        if _is_dora(self, adapter):
            # PEFT's DoRA rule: dropout only when the layer trains (and its dropout does)
            magnitude = self.lora_magnitude_vector[adapter].weight
            p = p if self.training else 0.0
        if p >= 1.0:  # PEFT accepts p = 1: the branch contributes zero (and zero gradients)
            scaling, p = 0.0, 0.0
    else:  # one call for all: [A_1; A_2; ...] and [s_1·B_1 | s_2·B_2 | ...]
        lora_a = torch.cat([self.lora_A[a].weight for a in active], 0)
        lora_b = torch.cat([self.lora_B[a].weight * self.scaling[a] for a in active], 1)
        scaling, p = 1.0, 0.0
    return low_rank_linear(x, base_weight, lora_a, lora_b, bias=bias, scaling=scaling,
                           dropout_p=p, training=p > 0, backend=self.__dict__[_BACKEND],
                           magnitude=magnitude)


class ServedLayer:
    """What a served class adds to the PEFT layer class it serves (``_peft_class``, after this
    mixin in its bases): a forward that runs the operator (``_served_forward``) where the call
    can be served, and PEFT's printed name. Everything else is PEFT's."""

    _lowrank_fused_served = True
    _peft_class: type

    def _get_name(self):  # prints as PEFT's layer does: "lora.Linear(...)"
        return self._peft_class.__name__

    def forward(self, x, *args, **kwargs):
        peft_forward = super().forward
        if args or kwargs:
            return peft_forward(x, *args, **kwargs)  # PEFT's mixed-batch path
        return self._served_forward(x, peft_forward)

    def _served_forward(self, x, peft_forward):
        raise NotImplementedError


class FusedLoraLinear(ServedLayer, LoraLinear):
    """PEFT's LoRA Linear whose forward (and so backward) runs ``low_rank_linear`` on the
    layer's own tensors; everything else is PEFT's. Made by ``enable_fused``, never directly."""

    _peft_class = LoraLinear

    def _served_forward(self, x, peft_forward):
        base = self.get_base_layer()
        return fused_forward(self, x, peft_forward, base.weight, base.bias)


def _fused_class(module):
    """The served class for a PEFT LoRA layer's class, or None."""
    if type(module) is LoraLinear:
        return FusedLoraLinear
    four_bit = lora_linear4bit_class()
    if four_bit is not None and type(module) is four_bit:
        from .qlora import FusedLoraLinear4bit
        return FusedLoraLinear4bit
    return None


def _is_fused(module) -> bool:
    return getattr(type(module), "_lowrank_fused_served", False)


def _quantized_reason(module) -> Optional[str]:
    """Why a PEFT LoRA layer over a quantized (bitsandbytes) base cannot be served, or None for
    a layer that is not over one, or is over a servable 4-bit base."""
    name = type(module).__name__
    if name in ("Linear8bitLt",) and type(module).__module__.startswith("peft."):
        return ("base layer bitsandbytes Linear8bitLt (8-bit, LLM.int8()) is not served: its "
                "outlier decomposition and int8 matmul are not reproduced by this package; "
                "only 4-bit (Linear4bit, NF4/FP4) bases are")
    four_bit = lora_linear4bit_class()
    if four_bit is None or not isinstance(module, four_bit):
        return None
    import bitsandbytes as bnb  # present: the PEFT class exists only with it

    base = module.get_base_layer()
    if type(base) not in (bnb.nn.Linear4bit, bnb.nn.LinearNF4, bnb.nn.LinearFP4):
        return f"base layer {type(base).__name__} is not a bitsandbytes Linear4bit"
    if getattr(base.weight, "quant_state", None) is None:
        return "its 4-bit base weight has no quant_state yet (move the model to its device)"
    return None


def _static_reason(module) -> Optional[str]:
    """Why this LoRA layer can never be served, or None."""
    quantized_reason = _quantized_reason(module)
    if quantized_reason is not None:
        return quantized_reason
    four_bit = lora_linear4bit_class()
    if four_bit is not None and isinstance(module, four_bit):
        if type(module).__name__ not in ("Linear4bit", "FusedLoraLinear4bit"):
            return f"{type(module).__name__} is a custom subclass of PEFT's LoRA Linear4bit"
        return None
    if not isinstance(module, LoraLinear):
        return f"{type(module).__name__} layers are not Linear"
    if type(module) not in (LoraLinear, FusedLoraLinear):
        return f"{type(module).__name__} is a custom subclass of PEFT's LoRA Linear"
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
    model: Optional[nn.Module] = field(default=None, repr=False)

    def disable(self) -> None:
        if self.model is not None:
            disable_fused(self.model)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.disable()


def _serve(root: nn.Module, backend: str, result: FusedPeft, stacklevel: int) -> None:
    for name, module in lora_layers(root):
        if _is_fused(module) and module.__dict__.get(_BACKEND) == backend:
            result.served.append(name)
            continue
        reason = _static_reason(module)
        module.__dict__[_NAME] = name
        if reason is not None:
            module.__dict__[_UNSERVABLE] = reason
            result.fallbacks[name] = reason
            _report_once(module, reason, stacklevel=stacklevel)
            continue
        if not _is_fused(module):
            module.__class__ = _fused_class(module)
        module.__dict__[_BACKEND] = backend
        result.served.append(name)


def _serve_new_layers(root: nn.Module, args) -> None:
    """Forward pre-hook of the enabled model: LoRA layers added since (add_adapter,
    load_adapter, inject_adapter_in_model) are served or reported before they run. The scan
    only reads types (about 0.6 ms for 400 modules on a busy CPU); the full pass runs only when
    a layer is new."""
    for module in root.modules():
        if (isinstance(module, LoraLayer) and not _is_fused(module)
                and _UNSERVABLE not in module.__dict__):
            _serve(root, root.__dict__[_BACKEND], FusedPeft(), stacklevel=4)
            return


def _remove_hook(root: nn.Module) -> None:
    for key, hook in list(root._forward_pre_hooks.items()):
        if hook is _serve_new_layers:
            del root._forward_pre_hooks[key]


def enable_fused(model: nn.Module, backend: str = "auto") -> FusedPeft:
    """Route every PEFT LoRA Linear layer of ``model``, and every one created later, through
    the fused operator; layers that cannot be served run PEFT's forward and are reported.

    Returns a ``FusedPeft`` (``served`` names, ``fallbacks`` with reasons, ``disable()``)."""
    if not lora_layers(model):
        raise ValueError("the model has no PEFT LoRA layer: build it with peft.get_peft_model "
                         "(or inject_adapter_in_model) first")
    _remove_hook(model)
    model.__dict__[_BACKEND] = backend
    result = FusedPeft(model=model)
    _serve(model, backend, result, stacklevel=4)
    model.register_forward_pre_hook(_serve_new_layers)
    return result


def disable_fused(model: nn.Module) -> None:
    """Undo ``enable_fused`` on ``model`` (also on a copy or an unpickled one): PEFT's forward."""
    _remove_hook(model)
    model.__dict__.pop(_BACKEND, None)
    for _, module in lora_layers(model):
        module.__dict__.pop(_UNSERVABLE, None)
        if _is_fused(module):
            module.__class__ = type(module)._peft_class
            module.__dict__.pop(_BACKEND, None)
