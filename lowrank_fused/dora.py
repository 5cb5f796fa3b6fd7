"""DoRA on the operator: the magnitude-scaled layer without the dense N x K product W + s·B·A.

    c = m / ‖W + s·B_eff·A‖_row          (detached, as DoRA §4.3 and PEFT do)
    y = c ⊙ (x·Wᵀ + s·P·B_effᵀ) + bias                       (no dropout, or eval)
    y = x·Wᵀ + bias + (c − 1) ⊙ x̃·Wᵀ + c ⊙ s·P·B_effᵀ         (dropout in training: PEFT's rule)

with P = x̃·Aᵀ, x̃ = dropout(x) (the project's seeded mask). This module computes c
(``column_scale``, run by the operator's forward body in ``ops``); the backends compute y and the
gradients from it (their ``dora_forward`` / ``dora_backward``).

The row norm is factored (``row_norm``): ‖W_n + s·b_n·A‖² = ‖W_n‖² + 2s·b_n·(A·W_nᵀ) +
s²·b_n·(A·Aᵀ)·b_nᵀ, in fp32 (fp64 for fp64 tensors), so no N x K tensor is formed per step; taken
as ‖W_n‖·sqrt(1 + (2s·b_n·(A·W_nᵀ) + s²·b_n·(A·Aᵀ)·b_nᵀ) / ‖W_n‖²) with ‖W_n‖ from
``torch.linalg.norm`` as PEFT takes it, so where B·A = 0 (PEFT's initialisation) the norm, and so
c = 1, are PEFT's exactly (PEFT's test_lora_use_dora_linear compares the output at init to the
base's with allclose's default atol 1e-8). The terms of W (‖W_n‖ and W·Aᵀ) are computed on every
call, from one read of W (``_weight_terms``): nothing is cached, so a write to W or A that no
version counter sees (``W.data.mul_(2)``, ``weight.data.copy_(new)``, common in weight-loading and
EMA code) can never leave a stale norm, and nothing Python-side lives inside a traced region.
A 16-bit W is widened to fp32 a slab of rows at a time, so the fp32 copy stays cache-sized.
Rows where the sum cancels (B·A close to −W: the result below ``CANCEL_RATIO`` of
‖W_n‖² + s²‖b_n·A‖²) are recomputed densely, those rows only, so the norm keeps fp32's relative
accuracy there too.

A 4-bit (bitsandbytes) W, QDoRA: the norm's terms of W come from W dequantized (bitsandbytes'
values, in fp32), per call as the forward and backward dequantize it (``quantized``).

Backward: with G' = c ⊙ G, the gradients of x, A, B, R are the plain operator's for G' (the
backend's ``backward``), plus, with dropout, the term of x through (c − 1) ⊙ x̃·Wᵀ:
dx += H − dropout(H), H = ((1 − c) ⊙ G)·W. dm = Σ_rows G ⊙ Z / ‖·‖ with Z = x̃·Wᵀ + s·P·B_effᵀ
(x̃ = x without dropout), the one M x N tensor kept (in the base dtype, only when m trains);
dbias = Σ_rows G. Without dropout and bias, Z = y / c: the output y is kept instead (the op
after the layer often keeps it too, so it costs no bytes of its own). Should y be changed in
place before backward (``nn.ReLU(inplace=True)`` after the layer), or c hold a zero, Z is
recomputed from x where x is kept (A trains); with A frozen (DoRA-FA) x is not kept, and the
backward raises ``InplaceOutputError`` naming the fix (see ``ops``).
"""
from __future__ import annotations

import torch
from torch import Tensor

from . import quantized

# A row whose factored ‖·‖² falls below this fraction of ‖W_n‖² + s²‖b_n·A‖² has lost more than
# about eps / CANCEL_RATIO of its relative accuracy to cancellation: it is recomputed densely.
CANCEL_RATIO = 1e-2


def _acc_dtype(t: Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _dense(weight, acc: torch.dtype) -> Tensor:
    """W in ``acc``; a 4-bit weight (a ``Packed4bit``) dequantized (bitsandbytes' values, a
    transient)."""
    return weight.to(acc) if isinstance(weight, Tensor) else weight.dequantize(acc)


def _acc_of(weight) -> torch.dtype:
    """fp32 (fp64 for an fp64 W; fp32 for a 4-bit one)."""
    return _acc_dtype(weight) if isinstance(weight, Tensor) else torch.float32


# A 16-bit W is widened to fp32 this many bytes at a time: one slab stays in a GPU's L2 cache.
_SLAB_BYTES = 16 << 20


def _weight_terms(weight, a: Tensor, acc: torch.dtype) -> tuple[Tensor, Tensor]:
    """(‖W_n‖ as ``torch.linalg.norm`` gives it, W·Aᵀ), both in ``acc``, from one read of W."""
    if isinstance(weight, Tensor) and weight.dtype in (torch.float16, torch.bfloat16):
        n, k = weight.shape
        step = max(1, _SLAB_BYTES // (4 * max(k, 1)))
        if step < n:
            norm = torch.empty(n, dtype=acc, device=weight.device)
            wa = torch.empty((n, a.shape[0]), dtype=acc, device=weight.device)
            for r0 in range(0, n, step):
                slab = weight[r0:r0 + step].to(acc)
                torch.linalg.norm(slab, dim=1, out=norm[r0:r0 + step])
                torch.mm(slab, a.T, out=wa[r0:r0 + step])
            return norm, wa
    w = _dense(weight, acc)
    return torch.linalg.norm(w, dim=1), w @ a.T


@torch.no_grad()
def row_norm(weight, lora_a: Tensor, lora_b_eff: Tensor, scaling: float) -> Tensor:
    """‖W + s·B_eff·A‖ per row (N,), detached, in fp32 (fp64 for fp64 tensors), without the
    dense N x K product (see the module docstring). ``weight``: dense, a bitsandbytes
    ``Params4bit`` or its ``quantized.Packed4bit`` view."""
    if quantized.is_4bit(weight):
        weight = quantized.packed(weight)
    return _row_norm(weight, lora_a, lora_b_eff, scaling)


def _row_norm(weight, lora_a: Tensor, lora_b_eff: Tensor, scaling: float) -> Tensor:
    acc = _acc_of(weight)
    s = float(scaling)
    a = lora_a.detach().to(acc)
    b = lora_b_eff.detach().to(acc)
    w = weight.detach() if isinstance(weight, Tensor) and weight.requires_grad else weight
    w_norm, wa = _weight_terms(w, a, acc)
    ba_sq = ((b @ (a @ a.T)) * b).sum(1)                    # ‖b_n·A‖²
    cross = (b * wa).sum(1)                                  # b_n·(A·W_nᵀ)
    w_sq = w_norm.square()
    extra = (2.0 * s) * cross + (s * s) * ba_sq
    sq = w_sq + extra
    scale = w_sq + (s * s) * ba_sq
    if sq.is_meta:  # shapes only
        return sq
    # ‖W_n‖·sqrt(1 + extra/‖W_n‖²): the same fp32 accuracy as sqrt(sq), and exactly PEFT's
    # ‖W_n‖ where the low-rank terms vanish (B = 0 at initialisation)
    norm = w_norm * (1.0 + extra / w_sq).clamp_min(0).sqrt()
    zero = w_sq == 0
    if bool(zero.any()):
        norm = torch.where(zero, sq.clamp_min(0).sqrt(), norm)
    bad = sq < CANCEL_RATIO * scale
    if bool(bad.any()):
        rows = bad.nonzero().squeeze(1)
        dense = _dense(weight, acc)[rows] + s * (b[rows] @ a)
        norm = norm.clone()
        norm[rows] = dense.square().sum(1).sqrt()
    return norm


def column_scale(weight, lora_a: Tensor, lora_b_eff: Tensor, magnitude: Tensor,
                 scaling: float) -> tuple[Tensor, Tensor]:
    """(c, ‖W + s·B_eff·A‖_row): DoRA's column scale c = m / ‖·‖ (detached, N-vectors in fp32,
    fp64 for fp64 tensors) and the norm it divides by (dm's denominator). ``weight``: dense or
    a ``quantized.Packed4bit``; called by the operator's forward body, without autograd."""
    norm = _row_norm(weight, lora_a, lora_b_eff, scaling)
    return magnitude.detach().to(norm.dtype) / norm, norm
