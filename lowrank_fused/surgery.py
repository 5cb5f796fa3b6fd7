"""Model surgery: swap matching ``nn.Linear`` modules for ``LowRankLinear`` and freeze the rest."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Union

from torch import nn

from . import quantized
from .layer import LowRankLinear


@dataclass
class LowRankSummary:
    """What ``apply_low_rank`` did: the replaced module names and the parameter counts."""

    replaced: list[str] = field(default_factory=list)
    trainable_parameters: int = 0
    total_parameters: int = 0

    def __str__(self) -> str:
        share = 100.0 * self.trainable_parameters / max(self.total_parameters, 1)
        return (f"{len(self.replaced)} layers adapted; trainable params: "
                f"{self.trainable_parameters:,} || all params: {self.total_parameters:,} "
                f"|| trainable%: {share:.4f}")


def _matches(name: str, targets: list[str]) -> bool:
    return any(name == t or name.endswith("." + t) for t in targets)


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts, each shared Parameter counted once."""
    params = {id(p): p for p in model.parameters()}.values()
    return (sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params))


def apply_low_rank(model: nn.Module, target_modules: Union[str, Iterable[str]], rank: int,
                   method: str = "lora", alpha: float | None = None, dropout: float = 0.0,
                   **layer_kwargs) -> LowRankSummary:
    """Replace, in place, every ``nn.Linear`` (or bitsandbytes 4-bit ``Linear4bit``: QLoRA) of
    ``model`` whose qualified name equals or ends
    with ``"." + t`` for a ``t`` in ``target_modules`` (PEFT's rule) by
    ``LowRankLinear.from_linear(linear, rank, method, alpha=alpha, dropout=dropout,
    **layer_kwargs)``, and freeze every other parameter.

    Each new layer's ``name`` is its qualified name (its calls' label in ``lowrank_fused.stats``).
    Returns a ``LowRankSummary`` with the trainable-parameter count: L·q·r·(K+N) for LoRA,
    L·q·r·N for LoRA-FA, L·q·r² for LoRA-XS. Raises ValueError when nothing matches.
    """
    targets = [target_modules] if isinstance(target_modules, str) else list(target_modules)
    if not targets:
        raise ValueError("target_modules is empty: name at least one module suffix")
    chosen = [(name, module) for name, module in model.named_modules()
              if (type(module) is nn.Linear or quantized.is_linear4bit(module))
              and _matches(name, targets)]
    if not chosen:
        linear_names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
        raise ValueError(f"no nn.Linear of the model matches target_modules={targets}; "
                         f"its Linear modules are: {linear_names[:20]}")

    for param in model.parameters():
        param.requires_grad_(False)
    summary = LowRankSummary()
    for name, linear in chosen:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        layer = LowRankLinear.from_linear(linear, rank, method, alpha=alpha, dropout=dropout,
                                          **layer_kwargs)
        layer.name = name  # its calls' label in lowrank_fused.stats
        setattr(parent, child, layer)
        summary.replaced.append(name)
    summary.trainable_parameters, summary.total_parameters = count_parameters(model)
    return summary
