"""Dropout on the low-rank branch, described by a seed instead of a stored mask.

The forward pass draws one integer seed; every backend derives its keep-mask from that seed
alone, so backward regenerates the mask instead of keeping an M x K tensor alive.

The mask (the same bits on every backend: this module, triton_kernels/dropout.py and
csrc/keep_mask.cuh implement it in uint32 arithmetic, wrapping mod 2^32)::

    mix(x)      = x ^= x >> 16; x *= 0x7FEB352D; x ^= x >> 15; x *= 0x846CA68B; x ^= x >> 16
    tail(x)     = x *= 0x7FEB352D; x ^= x >> 15; x *= 0x846CA68B; x ^= x >> 16
    s           = seed mod 2^32
    row_key(r)  = mix(r ^ mix(s))                          # once per row of a tile
    pair(c)     = (c >> 5) * 16 + (c & 15)                 # columns c and c + 16 of each
    half(c)     = (c >> 4) & 1                             #   aligned 32-column group pair up
    col_key(q)  = q * 0x9E3779B9 + mix(s ^ 0x9E3779B9)     # once per column pair of a tile
    h(r, q)     = tail(row_key(r) ^ col_key(q))            # one hash per two elements
    bits(r, c)  = h >> 16 if half(c) else h & 0xFFFF       # each element gets 16 of its bits
    keep(r, c)  = bits(r, pair(c)) >= t,   t = round(p * 2^16) clamped to [0, 2^16 - 1]

Rows and columns enter separately, so no M x K element offset is formed: masks do not repeat
however many elements the input has (below 2^32 rows and 2^32 columns). Per element the cost is
half a hash (an xor and the 6-instruction tail per pair), a 16-bit extract and a compare; the row
and column keys are amortised over a tile. A kernel covers a mask tile as two column halves,
columns ``c`` and ``c + 16`` of each 32-column group, one hash feeding both (see
triton_kernels/dropout.py).

p is quantised to a multiple of 2^-16 (``quantised_p``; an absolute change of at most 7.7e-6,
e.g. 0.1 -> 0.100006), exactly representable in float32, so every backend derives the same
threshold from it; the kept values are scaled by 1 / (1 - quantised p), so E[dropout(x)] = x
exactly for the quantised rate. (8-bit thresholds would give four elements per hash but move
p = 0.1 to 0.1016: too coarse to pass for the rate a user asked for.)

NaN and Inf: every backend multiplies by the (scaled) mask, as ``F.dropout`` does, so a NaN or
Inf in a dropped element gives NaN (0 * NaN, 0 * Inf), never a silent 0.
"""
from __future__ import annotations

from dataclasses import dataclass

from typing import Optional

import torch
from torch import Tensor

P_BITS = 16  # p is quantised to a multiple of 2**-P_BITS: one 16-bit half of a hash per element
_U32 = 0xFFFFFFFF
_MUL_1, _MUL_2 = 0x7FEB352D, 0x846CA68B
_COL_SALT = 0x9E3779B9
_COL_STEP = 0x9E3779B9  # odd: distinct column pairs get distinct keys
PAIR_SPAN = 16  # columns c and c + PAIR_SPAN of each aligned 2 * PAIR_SPAN group share a hash


def keep_threshold(p: float) -> int:
    """The integer t with quantised p = t / 2**16, for a drop probability ``p`` in [0, 1)."""
    return min(max(round(p * 2 ** P_BITS), 0), 2 ** P_BITS - 1)


def quantised_p(p: float) -> float:
    """The drop probability the mask realises for ``p``: the nearest multiple of 2**-16."""
    return keep_threshold(p) / 2 ** P_BITS


@dataclass(frozen=True)
class DropoutSpec:
    """Drop probability ``p`` (0 < p < 1) and the ``seed`` the keep-mask is derived from."""

    p: float
    seed: int

    @property
    def quantised_p(self) -> float:
        """The rate the mask realises (see the module docstring); the kernels receive this."""
        return quantised_p(self.p)

    @property
    def keep_scale(self) -> float:
        return 1.0 / (1.0 - self.quantised_p)


def seed_tensor(seed: Optional[int] = None) -> Tensor:
    """The dropout seed as a 1-element int64 CPU tensor (so torch.compile can trace drawing it):
    ``seed`` if given, else drawn from torch's global RNG, so ``torch.manual_seed`` governs it."""
    if seed is not None:
        return torch.tensor([int(seed)], dtype=torch.int64)
    return torch.randint(0, 2**31 - 1, (1,), dtype=torch.int64)


# ---- the mask in plain torch: int64 tensors holding uint32 values (torch has no uint32 ops) ----

def _mul32(x, c: int):
    # Low 32 bits of x * c without overflowing int64: split c into 16-bit halves.
    low = x * (c & 0xFFFF)
    high = ((x * (c >> 16)) & 0xFFFF) << 16
    return (low + high) & _U32


def _tail(x):
    x = _mul32(x, _MUL_1)
    x = x ^ (x >> 15)
    x = _mul32(x, _MUL_2)
    return x ^ (x >> 16)


def _mix(x):
    return _tail(x ^ (x >> 16))


def _mix_int(x: int) -> int:
    return int(_mix(torch.tensor(x & _U32, dtype=torch.int64)))


def column_pair(cols: Tensor) -> Tensor:
    """The hash index pair(c) each column reads (columns c and c + 16 of a 32-group share one)."""
    cols = cols.to(torch.int64)
    return ((cols >> 5) << 4) | (cols & (PAIR_SPAN - 1))


def keep_mask(seed: int, p: float, rows: Tensor, cols: Tensor) -> Tensor:
    """Boolean keep-mask of shape (len(rows), len(cols)) for global row and column indices
    (int64 tensors), drop probability ``p`` and ``seed``: the definition above."""
    s = int(seed) & _U32
    row_key = _mix(rows.to(torch.int64) ^ _mix_int(s))
    col_key = (_mul32(column_pair(cols), _COL_STEP) + _mix_int(s ^ _COL_SALT)) & _U32
    h = _tail(row_key[:, None] ^ col_key[None, :])
    high_half = ((cols.to(torch.int64) >> 4) & 1).bool()[None, :]
    bits = torch.where(high_half, h >> 16, h & 0xFFFF)
    return bits >= keep_threshold(p)
