"""``stats(model)``: the fused operator's calls per backend and per served layer of a PEFT
model, since ``enable_fused`` (or ``reset_stats``).

The operator counts where it dispatches (``lowrank_fused.stats``; inside its op bodies, so
torch.compile adds no guard and no recompile, and a forward re-run in backward under
activation checkpointing counts as "recompute"); each served layer labels its calls with its
module name, so this is a view of those counts filtered to the model's layers. Two models
served in one process whose layers have the same names share their counts.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from .. import stats as operator_stats
from .lora_layers import lora_layers
from .serving import NAME, STATE, flush_reports

KINDS = operator_stats.KINDS


@dataclass
class FusedStats:
    """``layers``: {layer name: {backend: {kind: calls}}} for every layer ``enable_fused``
    named (an empty dict: no call yet); ``fallbacks``: {layer name: reason} of those that run
    PEFT's forward. Kinds: "forward", "backward", "recompute" (activation checkpointing)."""

    layers: dict = field(default_factory=dict)
    fallbacks: dict = field(default_factory=dict)

    @property
    def backends(self) -> dict:
        """{backend: {kind: calls}} summed over the layers."""
        out: dict = {}
        for per_backend in self.layers.values():
            for backend, kinds in per_backend.items():
                total = out.setdefault(backend, {})
                for kind, calls in kinds.items():
                    total[kind] = total.get(kind, 0) + calls
        return out

    def calls(self, kind: str = "forward", backend=None) -> int:
        """Calls of ``kind`` over all layers (of one ``backend``, or of all)."""
        return sum(kinds.get(kind, 0) for name, kinds in self.backends.items()
                   if backend is None or name == backend)

    @property
    def served_layers(self) -> int:
        return len(self.layers) - len(self.fallbacks)

    def as_logs(self, prefix: str = "lowrank_fused") -> dict:
        """Numbers only, for a trainer's logs: ``<prefix>/<backend>/<kind>`` call counts,
        ``<prefix>/served_layers``, ``<prefix>/fallback_layers``."""
        logs = {f"{prefix}/{backend}/{kind}": calls
                for backend, kinds in sorted(self.backends.items())
                for kind, calls in sorted(kinds.items())}
        logs[f"{prefix}/served_layers"] = self.served_layers
        logs[f"{prefix}/fallback_layers"] = len(self.fallbacks)
        return logs

    def __str__(self) -> str:
        kinds = ", ".join(f"{self.calls(k)} {k}" for k in KINDS)
        per_backend = "; ".join(f"{b}: {sum(k.values())}" for b, k in sorted(self.backends.items()))
        return (f"lowrank_fused: {kinds} calls over {self.served_layers}/{len(self.layers)} LoRA "
                f"layers served ({per_backend or 'no call yet'})")


def _named_layers(model: nn.Module) -> list:
    return [m for _, m in lora_layers(model) if m.__dict__.get(NAME) is not None]


def stats(model: nn.Module) -> FusedStats:
    """The operator's calls by the served layers of ``model`` since ``enable_fused`` (or
    ``reset_stats``): per layer, per backend, per kind. Also says what a call met that
    stopped a layer from being served and was not said yet."""
    flush_reports()
    layers = _named_layers(model)
    counts = operator_stats.snapshot()
    result = FusedStats()
    for module in layers:
        name = module.__dict__[NAME]
        result.layers[name] = counts.get(name, {})
        state = module.__dict__.get(STATE)
        if state is not None and name in state["fallbacks"]:
            result.fallbacks[name] = state["fallbacks"][name]
    return result


def reset_stats(model: nn.Module) -> None:
    """Start the counts of ``model``'s served layers from zero."""
    operator_stats.reset([m.__dict__[NAME] for m in _named_layers(model)])
