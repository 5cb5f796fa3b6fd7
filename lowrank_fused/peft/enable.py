"""``enable_fused`` / ``disable_fused``: serve a PEFT model's LoRA Linear layers, say what was
served and what was not, and undo it.

``enable_fused`` validates everything before it changes anything: the backend can run on the
layers' devices, and every layer's reason not to be served (``reasons``: the layer itself, or
what its config decides: a LoRA bias, a variant, DoRA over several adapters, ...). With
``strict=True`` one such reason raises, listing every layer, and the model is left as it was;
otherwise those layers run PEFT's forward and the summary says so. It logs one line (logger
``lowrank_fused.peft``: INFO, WARNING when a layer falls back) and returns a ``FusedPeft`` that
prints as that line.

The enabled model gets a forward pre-hook that serves (or reports) LoRA layers created later,
and a forward hook that says, once per reason, what only a call could show (``serving``).
Each served layer labels its operator calls with its module name, so ``stats(model)``
(``call_counts``) reads them from ``lowrank_fused.stats``.
"""
from __future__ import annotations

import logging
from collections import Counter

from torch import nn

from .. import stats as operator_stats
from . import serving
from .call_counts import FusedStats, stats
from .lora_layers import LoraLayer, LoraLinear, lora_layers, lora_linear4bit_class
from .reasons import layer_reason, peft_class, static_reason
from .serving import BACKEND, NAME, REPORTED, STATE, FusedLoraLinear, flush_reports

logger = logging.getLogger("lowrank_fused.peft")

UNSERVABLE = "_lowrank_fused_unservable"  # on a layer: why it can never be served


def _is_served(module) -> bool:
    return getattr(type(module), "_lowrank_fused_served", False)


def _served_class(module) -> type:
    """The served class for a PEFT LoRA layer that ``static_reason`` accepts."""
    cls = peft_class(module)
    if cls is LoraLinear:
        return FusedLoraLinear
    if cls is lora_linear4bit_class():
        from .qlora import FusedLoraLinear4bit
        return FusedLoraLinear4bit
    raise AssertionError(f"no served class for {cls.__name__}")  # static_reason refuses it


def _grouped(fallbacks: dict) -> str:
    """"14 × adapter 'default' has a LoRA bias; 2 × ...": the reasons, most layers first."""
    counts = Counter(fallbacks.values())
    return "; ".join(f"{n} × {reason}" for reason, n in counts.most_common())


class FusedPeft:
    """What ``enable_fused`` did. ``served``: the names of the layers that run the operator;
    ``fallbacks``: {name: reason} of those that run PEFT's forward (found at enable time, and
    any a later call met); ``backend`` (as asked) and ``backends`` ({device: what it means
    there}); ``summary()`` (what it prints as); ``stats()`` (the operator's calls);
    ``disable()`` (or leaving a ``with`` block) restores PEFT."""

    def __init__(self, model: nn.Module, backend: str, backends: dict, state: dict):
        self.model, self.backend, self.backends = model, backend, backends
        self._state = state  # shared with the model's layers: a call-time fallback lands here

    @property
    def served(self) -> list:
        return self._state["served"]

    @property
    def fallbacks(self) -> dict:
        return self._state["fallbacks"]

    @property
    def layers(self) -> int:
        return len(self.served) + len(self.fallbacks)

    def summary(self) -> str:
        """e.g. "14/14 LoRA layers served, backend auto → reference on cpu, 0 fallbacks"."""
        where = ", ".join(f"{name} on {device}" for device, name in self.backends.items())
        n = len(self.fallbacks)
        text = (f"{len(self.served)}/{self.layers} LoRA layers served, backend {self.backend} → "
                f"{where or 'nothing'}, {n} fallback{'' if n == 1 else 's'}")
        return text + (f" ({_grouped(self.fallbacks)})" if n else "")

    __str__ = summary

    def __repr__(self) -> str:
        return f"FusedPeft({self.summary()})"

    def stats(self) -> FusedStats:
        """``lowrank_fused.peft.stats(model)`` of the model this enabled."""
        return stats(self.model)

    def disable(self) -> None:
        disable_fused(self.model)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.disable()


def _backends(backend: str, layers: list) -> dict:
    """{device: what ``backend`` means there, in words (``dispatch.describe``: a backend's
    name, or "auto (timed per shape: ...)" on a GPU)} over the layers' devices; raises (before
    anything changes) for an unknown backend or one that cannot run there."""
    from .. import dispatch

    devices = []
    for _, module in layers:
        for p in module.lora_A.parameters():
            if p.device not in devices:
                devices.append(p.device)
    return {str(d): dispatch.describe(backend, d) for d in devices}


def _plan(layers: list) -> list:
    """[(name, module, static reason, reason)] for every LoRA layer; changes nothing."""
    plan = []
    for name, module in layers:
        static = static_reason(module)
        plan.append((name, module, static, static or layer_reason(module)))
    return plan


def _strict_error(plan: list) -> ValueError:
    lines = [f"  {name}: {reason}" for name, _, _, reason in plan if reason is not None]
    return ValueError(f"enable_fused(strict=True): {len(lines)} of {len(plan)} LoRA layers would "
                      "run PEFT's own forward; the model was not changed:\n" + "\n".join(lines))


def _apply(backend: str, plan: list, state: dict, at_call: bool) -> None:
    """Serve the planned layers; those with a reason are noted (at a call: reported)."""
    for name, module, static, reason in plan:
        for key in (REPORTED, UNSERVABLE):
            module.__dict__.pop(key, None)
        module.__dict__[NAME] = name
        module.__dict__[STATE] = state
        if static is not None:
            module.__dict__[UNSERVABLE] = static
        else:
            if not _is_served(module):
                module.__class__ = _served_class(module)
            module.__dict__[BACKEND] = backend
        if reason is None:
            state["served"].append(name)
            continue
        if not at_call:  # at a call, _report_once lists it with the reports it defers
            state["fallbacks"][name] = reason
        # looked up on the module: tools/peft_served_plugin.py counts the reports there
        serving._report_once(module, reason, at_call=at_call)


def _new_layers(root: nn.Module) -> list:
    return [(name, module) for name, module in root.named_modules()
            if isinstance(module, LoraLayer) and not _is_served(module)
            and UNSERVABLE not in module.__dict__]


def _serve_new_layers(root: nn.Module, args) -> None:
    """Forward pre-hook of the enabled model: LoRA layers added since (add_adapter,
    load_adapter, inject_adapter_in_model) are served or reported before they run. The scan
    only reads types (about 0.6 ms for 400 modules on a busy CPU)."""
    for module in root.modules():
        if (isinstance(module, LoraLayer) and not _is_served(module)
                and UNSERVABLE not in module.__dict__):
            state = root.__dict__.setdefault(STATE, {"served": [], "fallbacks": {}})
            _apply(root.__dict__[BACKEND], _plan(_new_layers(root)), state, at_call=True)
            return


def _say_call_fallbacks(root: nn.Module, args, output) -> None:
    """Forward hook of the enabled model: the reasons its layers met in this pass, said once."""
    flush_reports()


def _remove_hooks(root: nn.Module) -> None:
    for hooks, fn in ((root._forward_pre_hooks, _serve_new_layers),
                      (root._forward_hooks, _say_call_fallbacks)):
        for key, hook in list(hooks.items()):
            if hook is fn:
                del hooks[key]


def enable_fused(model: nn.Module, backend: str = "auto", strict: bool = False) -> FusedPeft:
    """Route every PEFT LoRA Linear layer of ``model``, and every one created later, through
    the fused operator.

    Args:
        model: a PEFT model (``get_peft_model``, ``PeftModel.from_pretrained``, or any module
            holding PEFT LoRA layers).
        backend: "auto", "reference", "triton" or "cuda" (``low_rank_linear``'s); checked
            against the layers' devices before anything changes.
        strict: raise instead of falling back: ValueError listing every layer that would run
            PEFT's own forward and why; the model is left as it was.

    Layers that cannot be served run PEFT's forward and are listed in ``fallbacks``; one line
    is logged (``lowrank_fused.peft``). Returns a ``FusedPeft``.

    Raises:
        ValueError: no PEFT LoRA layer; an unknown backend; ``strict`` and a layer not served.
        lowrank_fused.BackendUnavailableError: ``backend`` cannot run on the layers' devices.
    """
    layers = lora_layers(model)
    if not layers:
        raise ValueError("the model has no PEFT LoRA layer: build it with peft.get_peft_model "
                         "(or inject_adapter_in_model) first")
    backends = _backends(backend, layers)
    plan = _plan(layers)
    if strict and any(reason is not None for *_, reason in plan):
        raise _strict_error(plan)

    _remove_hooks(model)
    model.__dict__[BACKEND] = backend
    state = model.__dict__[STATE] = {"served": [], "fallbacks": {}}
    _apply(backend, plan, state, at_call=False)
    operator_stats.reset([name for name, _ in layers])  # counts start at enable
    model.register_forward_pre_hook(_serve_new_layers)
    model.register_forward_hook(_say_call_fallbacks)
    result = FusedPeft(model, backend, backends, state)
    logger.log(logging.WARNING if result.fallbacks else logging.INFO,
               "lowrank_fused: %s", result.summary())
    return result


def disable_fused(model: nn.Module) -> None:
    """Undo ``enable_fused`` on ``model`` (also on a copy or an unpickled one): PEFT's forward."""
    _remove_hooks(model)
    for key in (BACKEND, STATE):
        model.__dict__.pop(key, None)
    for _, module in lora_layers(model):  # the name stays: stats(model) still reads the calls
        for key in (UNSERVABLE, REPORTED, STATE, BACKEND):
            module.__dict__.pop(key, None)
        if _is_served(module):
            module.__class__ = type(module)._peft_class


def served_layers(model: nn.Module) -> dict:
    """{name: module} of the layers of ``model`` that ``enable_fused`` named (served or not)."""
    return {m.__dict__[NAME]: m for _, m in lora_layers(model) if NAME in m.__dict__}
