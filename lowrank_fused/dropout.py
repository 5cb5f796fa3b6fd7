"""Dropout on the low-rank branch, described by a seed instead of a stored mask.

The forward pass draws one integer seed; every backend derives its keep-mask from that seed
alone, so backward regenerates the mask instead of keeping an M x K tensor alive.
"""
from __future__ import annotations

from dataclasses import dataclass

from typing import Optional

import torch
from torch import Tensor


@dataclass(frozen=True)
class DropoutSpec:
    """Drop probability ``p`` (0 < p < 1) and the ``seed`` the keep-mask is derived from."""

    p: float
    seed: int

    @property
    def keep_scale(self) -> float:
        return 1.0 / (1.0 - self.p)


def seed_tensor(seed: Optional[int] = None) -> Tensor:
    """The dropout seed as a 1-element int64 CPU tensor (so torch.compile can trace drawing it):
    ``seed`` if given, else drawn from torch's global RNG, so ``torch.manual_seed`` governs it."""
    if seed is not None:
        return torch.tensor([int(seed)], dtype=torch.int64)
    return torch.randint(0, 2**31 - 1, (1,), dtype=torch.int64)
