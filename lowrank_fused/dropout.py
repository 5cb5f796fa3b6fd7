"""Dropout on the low-rank branch, described by a seed instead of a stored mask.

The forward pass draws one integer seed; every backend derives its keep-mask from that seed
alone, so backward regenerates the mask instead of keeping an M x K tensor alive.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class DropoutSpec:
    """Drop probability ``p`` (0 < p < 1) and the ``seed`` the keep-mask is derived from."""

    p: float
    seed: int

    @property
    def keep_scale(self) -> float:
        return 1.0 / (1.0 - self.p)


def draw_seed(device: torch.device) -> int:
    """Draw a seed from torch's global RNG of ``device`` so ``torch.manual_seed`` governs dropout."""
    generator_device = device if device.type == "cuda" else torch.device("cpu")
    return int(torch.randint(0, 2**31 - 1, (1,), device=generator_device).item())
