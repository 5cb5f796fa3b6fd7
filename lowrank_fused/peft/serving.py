"""The forward of a served PEFT LoRA layer: the fused operator where the call can be served,
PEFT's own forward (reported) where it cannot.

Mechanism: a served layer's ``__class__`` becomes ``FusedLoraLinear`` (or, over a bitsandbytes
4-bit base in PEFT's 4-bit class, ``qlora.FusedLoraLinear4bit``), a subclass of PEFT's class
that overrides only ``forward``. Why a class swap and not the alternatives:

- Nothing is stored per instance but plain data, so pickling, ``copy.deepcopy`` and
  ``torch.save``/``torch.load`` give a served model back (a bound method on the instance does
  not unpickle).
- ``LoraConfig._register_custom_module`` only acts when PEFT builds layers from that one config:
  ``add_adapter``/``load_adapter`` with a new config, ``from_pretrained`` and
  ``inject_adapter_in_model`` would all build plain layers again (``enable``'s pre-hook finds
  those at the next forward, whatever created them).
- State dicts, ``save_pretrained`` and PEFT's own ``isinstance`` checks see PEFT's class.

Over a 4-bit base (PEFT's ``lora.bnb.Linear4bit``, or its plain ``lora.Linear`` around a
bitsandbytes ``Linear4bit`` when the model was not marked ``is_loaded_in_4bit``) x is cast to
the base's compute dtype as bitsandbytes does, the ``Params4bit`` goes to the operator as it
is (dequantized per call, never saved) and y comes back in x's dtype.

PEFT's DoRA (one active adapter, over a plain nn.Linear or a 4-bit base) runs through the
operator's ``magnitude=`` (``dispatch.select``: Triton on CUDA tensors, the reference path on
the CPU and for QDoRA). What cannot be served (``reasons``) runs PEFT's forward; a reason
met at call time is said once, for all the layers that met it in one pass
(``flush_reports``), not once per layer. ``enable`` (``enable_fused``) imports this module,
never the other way round.
"""
from __future__ import annotations

import warnings
import torch

from ..functional import low_rank_linear
from .input_cast import shared_cast
from .lora_layers import LoraLinear, is_bnb_linear4bit
from .reasons import active_adapters, call_reason, dropout_p, is_dora

# keys in a served layer's __dict__ (plain data: copies and pickles carry them)
BACKEND = "_lowrank_fused_backend"  # the backend its calls ask for
NAME = "_lowrank_fused_name"  # its module name: labels its calls in lowrank_fused.stats
REPORTED = "_lowrank_fused_reported"  # the reasons it has reported since enable_fused
# on the enabled root and its layers, one dict: {"served": [names], "fallbacks": {name: reason}}
STATE = "_lowrank_fused_state"

_pending: dict = {}  # reason -> names of the layers that met it at call time, not yet said


def _report_once(module, reason: str, at_call: bool = True) -> None:
    """Note that ``module`` runs PEFT's forward for ``reason``. Each layer notes a reason
    once; a reason first met at a call waits in ``_pending`` until ``flush_reports``, so one
    warning covers every layer that met it. A layer meeting a pending reason again means its
    pass is over: the pending reports are said then, if no root forward hook said them."""
    reported = module.__dict__.setdefault(REPORTED, set())
    name = module.__dict__.get(NAME, type(module).__name__)
    if reason in reported:
        if name in _pending.get(reason, ()):
            flush_reports()
        return
    reported.add(reason)
    if at_call:
        _pending.setdefault(reason, []).append(name)
        state = module.__dict__.get(STATE)
        if state is not None:  # enable_fused's result lists it from now on
            state["fallbacks"].setdefault(name, reason)
            if name in state["served"]:
                state["served"].remove(name)


def _names(names: list, limit: int = 3) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def flush_reports() -> None:
    """Say, once per reason, which layers met it at call time since the last flush."""
    while _pending:
        reason, names = _pending.popitem()
        layers = "1 LoRA layer runs" if len(names) == 1 else f"{len(names)} LoRA layers run"
        warnings.warn(f"lowrank_fused: {layers} PEFT's own forward: {reason} "
                      f"({_names(names)})", stacklevel=3)


def fused_forward(self, x, peft_forward, base_weight, bias):
    """The served forward of a PEFT LoRA layer ``self`` over ``base_weight`` (dense or 4-bit),
    or PEFT's own (``peft_forward``) where the call cannot be served."""
    if self.disable_adapters or self.merged:
        return peft_forward(x)  # PEFT's base-only path
    active = active_adapters(self)
    if not active:
        return peft_forward(x)
    reason = call_reason(self, active)
    if reason is not None:
        _report_once(self, reason)
        return peft_forward(x)

    magnitude = None
    if len(active) == 1:
        (adapter,) = active
        lora_a, lora_b = self.lora_A[adapter].weight, self.lora_B[adapter].weight
        scaling, p = self.scaling[adapter], dropout_p(self, adapter)
        if is_dora(self, adapter):
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
                           dropout_p=p, training=p > 0, backend=self.__dict__[BACKEND],
                           magnitude=magnitude, name=self.__dict__.get(NAME))


def forward_over_4bit(self, x, peft_forward):
    """``fused_forward`` over a bitsandbytes 4-bit base, as its ``Linear4bit.forward`` does
    the base: x cast to the compute dtype (bias too), y cast back to x's dtype. Unlike PEFT's
    forward it does not clone the base output nor cast x to the adapters' fp32 (a full-width
    copy that a trainable A keeps): the operator casts x inside its own pass and keeps x only
    for a trainable A. Where x must be cast (an fp32 model over a bf16-computing base), the
    sibling layers reading one x share one cast (``input_cast``)."""
    base = self.get_base_layer()
    if getattr(base.weight, "quant_state", None) is None:
        _restore_quant_state(base)
    if base.compute_dtype is None:  # bitsandbytes sets it on its first call, from x
        base.set_compute_type(x)
        base.compute_type_is_set = True
    compute = base.compute_dtype or x.dtype
    bias = base.bias
    if bias is not None and bias.dtype != compute:
        bias = bias.to(compute)
    x_c = shared_cast(x, compute)  # q/k/v (gate/up) share one cast copy
    y = fused_forward(self, x_c, lambda _: peft_forward(x), base.weight, bias)
    return y if y.dtype == x.dtype else y.to(x.dtype)


def _restore_quant_state(base) -> None:
    """Give a 4-bit base's weight its quant state back from the module, as bitsandbytes'
    forward does: FSDP's all-gathered (unsharded) weight is a plain tensor without it."""
    from bitsandbytes.nn import modules as bnb_modules  # imported: base is one of its layers

    restore = getattr(bnb_modules, "fix_4bit_weight_quant_state_from_module", None)
    if restore is not None:
        restore(base)


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
        if args or kwargs:  # PEFT's mixed-adapter batch (adapter_names=), or extra arguments
            if not (self.disable_adapters or self.merged):
                _report_once(self, "a call with extra arguments ("
                             + ", ".join(sorted(kwargs) or ["positional"])
                             + "): PEFT's mixed-adapter batch")
            return peft_forward(x, *args, **kwargs)
        return self._served_forward(x, peft_forward)

    def _served_forward(self, x, peft_forward):
        raise NotImplementedError


class FusedLoraLinear(ServedLayer, LoraLinear):
    """PEFT's LoRA Linear whose forward (and so backward) runs ``low_rank_linear`` on the
    layer's own tensors; everything else is PEFT's. Made by ``enable_fused``, never directly."""

    _peft_class = LoraLinear

    def _served_forward(self, x, peft_forward):
        base = self.get_base_layer()
        if is_bnb_linear4bit(base):  # a hand-assembled QLoRA model: PEFT's plain Linear
            return forward_over_4bit(self, x, peft_forward)
        return fused_forward(self, x, peft_forward, base.weight, base.bias)

