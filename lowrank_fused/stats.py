"""Call counts of the operator, per call name and backend, since the last ``reset``.

The operator records each call where it dispatches (inside the op bodies, which run at run time
under torch.compile too, so counting adds no guard and no recompile): ``record(name, backend,
kind)`` with ``kind`` one of "forward", "backward", or "recompute" (a forward run again during a
backward pass: activation checkpointing). ``name`` is what the caller passed as
``low_rank_linear(..., name=)`` (served PEFT layers and ``LowRankLinear`` pass their module
name), None for an unnamed call.
"""
from __future__ import annotations

import threading
from typing import Optional

import torch

KINDS = ("forward", "backward", "recompute")

_lock = threading.Lock()
_counts: dict = {}  # (name, backend, kind) -> calls

# -1 outside a backward pass; a forward seen inside one is a checkpointed recompute.
_graph_task_id = getattr(torch._C, "_current_graph_task_id", lambda: -1)


def record(name: Optional[str], backend: str, kind: str) -> None:
    """Count one call of the operator by ``backend`` ("reference", "triton", "cuda")."""
    if kind == "forward" and _graph_task_id() != -1:
        kind = "recompute"
    key = (name, backend, kind)
    with _lock:
        _counts[key] = _counts.get(key, 0) + 1


def snapshot() -> dict:
    """{name: {backend: {kind: calls}}} of every call since the last reset."""
    out: dict = {}
    with _lock:
        items = list(_counts.items())
    for (name, backend, kind), calls in items:
        out.setdefault(name, {}).setdefault(backend, {})[kind] = calls
    return out


def reset(names=None) -> None:
    """Forget the counts of ``names`` (an iterable of call names), or of every call."""
    with _lock:
        if names is None:
            _counts.clear()
            return
        names = set(names)
        for key in [k for k in _counts if k[0] in names]:
            del _counts[key]
