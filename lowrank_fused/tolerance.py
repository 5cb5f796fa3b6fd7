"""The tolerance rule every kernel is held to, in one place: the tests assert it
(tests/tolerance.py) and the first-use check (``verification``) applies it at run time.

A kernel's output is compared with a float64 reference of the same computation; its largest
error may be at most twice the largest error PyTorch makes doing the same computation in the
low precision (the reference backend, or the same formula, run in the low dtypes), plus a small
atol relative to the largest reference value: one unit of rounding of the computation's lowest
precision, plus four of float32 for the kernels' own fp32 summation order (for small outputs where
PyTorch happens to round luckily, or gets the value exact). So a kernel may round differently
from PyTorch, but not worse.

Where a result cancels (a dot product much smaller than the sum of its terms' magnitudes), each
rounding error scales with the terms, not with the result: a caller that can compute the same
math on the inputs' absolute values in float64 (``magnitude``) has the atol taken relative to
that instead. Without it (the first-use check at run time) the atol is relative to the result.
"""
from __future__ import annotations

from typing import Optional

import torch

SLACK = 2.0  # kernel error / PyTorch's low-precision error
ACCUMULATION_ULPS = 4  # float32 units, for a summation order other than PyTorch's
FP32_EPS = torch.finfo(torch.float32).eps


def kernel_mismatch(got, want64, torch_low, name="output", dtype=None,
                    magnitude=None) -> Optional[str]:
    """None when ``got`` (the kernel's result) is within the rule of ``want64`` (the float64
    reference), given ``torch_low`` (the same computation done by PyTorch in the low precision);
    else a sentence saying by how much it is not. ``dtype``: the lowest precision the computation
    rounds to (default: ``got``'s dtype); ``magnitude``: the same computation in float64 on the
    inputs' absolute values (optional: the atol's scale where the result cancels). Shapes must
    match (callers check them). A NaN in the kernel's error, or in the bound, is a mismatch."""
    want64 = want64.detach().double()
    if want64.numel() == 0:
        return None
    kernel_err = (got.detach().double() - want64).abs().max().item()
    torch_err = (torch_low.detach().double() - want64).abs().max().item()
    scale = want64.abs().max().item()
    if magnitude is not None:
        scale = max(scale, magnitude.detach().double().abs().max().item())
    scale = scale or 1.0
    atol = (torch.finfo(dtype or got.dtype).eps + ACCUMULATION_ULPS * FP32_EPS) * scale
    bound = SLACK * torch_err + atol
    if kernel_err <= bound:
        return None
    return (f"{name}: kernel's max error {kernel_err:.3g} exceeds {SLACK:g} x PyTorch's "
            f"low-precision error {torch_err:.3g} + atol {atol:.3g} (largest |reference| "
            f"{scale:.3g}{', of its terms' if magnitude is not None else ''})")
