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

``keep_mask`` below is this definition in plain torch ops; ``keep_mask_chunks`` computes the same
bits several times faster (int32, one hash per pair, row chunks in cache) for the reference backend.

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
from typing import Iterator, Optional

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


# ---- the same mask, fast: int32 tensors, one hash per column pair, row chunks kept in cache ----
#
# keep_mask above is the readable definition; keep_mask_chunks computes the same bits (tested
# equal bit for bit in tests/test_dropout_mask.py) in about a third of torch's bernoulli_ time per
# element on a CPU core, where keep_mask takes 7 to 10 times bernoulli_'s. How:
#   * int32 tensors hold the uint32 values: torch's int32 multiply wraps mod 2^32 (checked once
#     per process against the definition, falling back to it if not), a right shift is
#     arithmetic, so ``x >> 15`` is followed by ``& 0x1FFFF`` to make it logical;
#   * one hash per column pair (M x K/2 values), both of its 16-bit halves compared at once:
#     with y the hash before its last ``^= y >> 16``, bits(c + 16) = y >> 16 and
#     bits(c) = (y ^ (y >> 16)) & 0xFFFF, i.e. the high half of z = y ^ (y << 16);
#     keep <=> y >= t << 16 (resp. z), compared unsigned;
#   * the unsigned compare without a compare op (torch's comparisons into bool are slow on CPU):
#     y' = y ^ 2^31 = 2^31 + 0x846CA68B * w in one add (z' = z ^ 2^31 follows), then
#     clamp(y', T' - 1, T') - (T' - 1) with T' = (t << 16) - 2^31 is 1 where kept, else 0; one
#     stack interleaves the two halves into the columns' order, one copy converts to the dtype;
#   * rows go in chunks of about _CHUNK_PAIRS pairs, reusing the same buffers, so the ten-odd
#     passes stay in cache and the caller applies each chunk before the next is made.

_CHUNK_PAIRS = 1 << 16  # on a CPU: ~1 MB of int32 and fp32 buffers per chunk, L2-sized
_DEVICE_CHUNK_PAIRS = 1 << 24  # elsewhere (a GPU without kernels): few launches matter more
_INT_MIN = -(1 << 31)


def _as_int32(v: int) -> int:
    """The int32 with v's low 32 bits."""
    v &= _U32
    return v - (1 << 32) if v >> 31 else v


def _mix_py(x: int) -> int:
    """mix() on a Python int (the seed's keys: no tensor ops for two scalars)."""
    x &= _U32
    x ^= x >> 16
    x = x * _MUL_1 & _U32
    x ^= x >> 15
    x = x * _MUL_2 & _U32
    return x ^ (x >> 16)


def _shr32(x: Tensor, n: int) -> Tensor:
    """Logical x >> n of an int32 tensor holding uint32 bits (torch's >> is arithmetic)."""
    return (x >> n).bitwise_and_((1 << (32 - n)) - 1)


def _index32(start: int, count: int, device) -> Tensor:
    """start, start + 1, ... (below 2^32) as int32 tensors of their uint32 bits."""
    idx = torch.arange(start, start + count, device=device, dtype=torch.int64)
    return (idx - ((idx >> 31) << 32)).to(torch.int32) if start + count > 2 ** 31 else \
        idx.to(torch.int32)


def _row_keys32(s: int, row0: int, m: int, device) -> Tensor:
    """row_key(r) for r in [row0, row0 + m), int32 bits."""
    x = _index32(row0, m, device).bitwise_xor_(_as_int32(_mix_py(s)))
    x.bitwise_xor_(_shr32(x, 16)).mul_(_MUL_1)
    x.bitwise_xor_(_shr32(x, 15)).mul_(_as_int32(_MUL_2))
    return x.bitwise_xor_(_shr32(x, 16))


def _col_keys32(s: int, q0: int, count: int, device) -> Tensor:
    """col_key(q) for column pairs q in [q0, q0 + count), int32 bits."""
    return _index32(q0, count, device).mul_(_as_int32(_COL_STEP)).add_(
        _as_int32(_mix_py(s ^ _COL_SALT)))


def keep_mask_chunks(seed: int, p: float, shape, device=None, dtype: torch.dtype = torch.float32,
                     row0: int = 0, col0: int = 0) -> Iterator[tuple[slice, Tensor]]:
    """Yields ``(rows, mask)`` over row chunks of the (M, K) = ``shape`` keep-mask at global
    offsets ``row0``, ``col0``: ``mask`` equals ``keep_mask(seed, p, arange(row0, row0 + M)[rows],
    arange(col0, col0 + K))`` as 1 (kept) / 0 (dropped) in ``dtype`` (unscaled). Each ``mask``
    is a view of a buffer the next chunk overwrites: use it before asking for the next one."""
    m, k = shape
    if m == 0 or k == 0:
        return
    t = keep_threshold(p)
    if t == 0 or not _fast_mask_ok():  # nothing dropped (T' - 1 would underflow), or fallback
        cols = torch.arange(col0, col0 + k, device=device)
        step = max(1, (2 * _CHUNK_PAIRS) // k)
        for r in range(0, m, step):
            rows = slice(r, min(m, r + step))
            yield rows, keep_mask(seed, p, torch.arange(row0 + r, row0 + rows.stop,
                                                        device=device), cols).to(dtype)
        return
    s = int(seed) & _U32
    g0, g1 = col0 >> 5, (col0 + k + 31) >> 5  # aligned 32-column groups covering the columns
    groups = g1 - g0
    col_key = _col_keys32(s, g0 * PAIR_SPAN, groups * PAIR_SPAN, device)
    first = col0 - g0 * 32
    width = groups * PAIR_SPAN
    on_cpu = device is None or torch.device(device).type == "cpu"
    step = max(1, (_CHUNK_PAIRS if on_cpu else _DEVICE_CHUNK_PAIRS) // width)
    row_key = _row_keys32(s, row0, m, device)
    lim = _as_int32((t << 16) - (1 << 31))  # T': keep <=> y' >= T' (signed)
    rows_max = min(step, m)
    # halves[0]: z' (columns c of each 32-group), halves[1]: y' (columns c + 16), interleaved
    # into the columns' order by one stack (a strided copy of 16-element runs is 4x slower)
    halves = torch.empty((2, rows_max, width), dtype=torch.int32, device=device)
    keep = torch.empty((rows_max, groups, 2, PAIR_SPAN), dtype=torch.int32, device=device)
    mask = torch.empty((rows_max, groups * 32), dtype=dtype, device=device)
    mul_2 = _as_int32(_MUL_2)
    int_min = torch.tensor(_INT_MIN, dtype=torch.int32, device=device)
    for r in range(0, m, step):
        n = min(m, r + step) - r
        z, y = halves[0, :n], halves[1, :n]
        torch.bitwise_xor(row_key[r:r + n, None], col_key[None, :], out=y)
        y.mul_(_MUL_1)                              # tail(): x *= 0x7FEB352D
        torch.bitwise_right_shift(y, 15, out=z)
        z.bitwise_and_(0x1FFFF).bitwise_xor_(y)     # x ^= x >> 15 (logical)
        torch.add(int_min, z, alpha=mul_2, out=y)   # y' = (x * 0x846CA68B) ^ 2^31: column c + 16
        torch.bitwise_left_shift(y, 16, out=z)
        z.bitwise_xor_(y)                           # z' = y' ^ (y' << 16): column c
        both = halves[:, :n].clamp_(lim - 1, lim).sub_(lim - 1)  # 1: kept, 0: dropped
        torch.stack((z.view(n, groups, PAIR_SPAN), y.view(n, groups, PAIR_SPAN)), dim=2,
                    out=keep[:n])
        mask[:n].copy_(keep[:n].view(n, groups * 32))
        yield slice(r, r + n), mask[:n, first:first + k]


def fast_keep_mask(seed: int, p: float, shape, device=None, row0: int = 0,
                   col0: int = 0) -> Tensor:
    """The whole keep-mask of keep_mask_chunks as a bool tensor (tests, dropout_keep_mask)."""
    out = torch.empty(shape, dtype=torch.bool, device=device)
    for rows, mask in keep_mask_chunks(seed, p, shape, device, torch.uint8, row0, col0):
        out[rows] = mask
    return out


_FAST_OK: Optional[bool] = None


def _fast_mask_ok() -> bool:
    """Whether this torch's int32 arithmetic gives the definition's bits (multiplies wrap mod
    2^32 on every build we know of); checked once per process, on the CPU, on a small block at
    offsets and a seed past 2^31."""
    global _FAST_OK
    if _FAST_OK is None:
        _FAST_OK = True  # so fast_keep_mask below takes the fast path
        seed, p, row0, col0, shape = 2 ** 32 + 0x9E3779B9, 0.3, 2 ** 31 - 3, 2 ** 31 - 37, (6, 75)
        want = keep_mask(seed, p, torch.arange(row0, row0 + shape[0]),
                         torch.arange(col0, col0 + shape[1]))
        _FAST_OK = torch.equal(fast_keep_mask(seed, p, shape, row0=row0, col0=col0), want)
    return _FAST_OK
