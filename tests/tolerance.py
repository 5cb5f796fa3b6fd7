"""The one tolerance rule of every kernel test.

A kernel's output is compared with a float64 reference of the same computation; its largest
error may be at most twice the largest error PyTorch makes doing the same computation in the
low precision (the reference backend, or the same formula, run in the low dtypes), plus a small
atol relative to the largest reference value: one unit of rounding of the computation's lowest
precision, plus four of float32 for the kernels' own fp32 summation order (for small outputs where
PyTorch happens to round luckily, or gets the value exact). So a kernel may round differently
from PyTorch, but not worse.

PyTorch's error is a maximum over the output's elements. Over a handful of elements (a LoRA-XS
dR at r = 1 is one number) it is one or two draws of the rounding, which can land near zero on
a sum with heavy cancellation; there, given the sum's ``square_magnitude`` (the float64 result
of the same computation on squared operands: the sum of its squared terms), the atol also covers
FEW_SIGMAS standard deviations of rounding each term once to nearest, (eps/2)/√3 per unit of
sqrt(sum of squared terms).
"""
import torch

SLACK = 2.0  # kernel error / PyTorch's low-precision error
ACCUMULATION_ULPS = 4  # float32 units, for a summation order other than PyTorch's
FP32_EPS = torch.finfo(torch.float32).eps
FEW = 16  # elements: below this PyTorch's max error is too small a sample to scale a bound by
FEW_SIGMAS = 4.0


def assert_kernel_close(got, want64, torch_low, name="output", dtype=None, square_magnitude=None):
    """``got``: the kernel's result; ``want64``: the float64 reference; ``torch_low``: the same
    computation done by PyTorch in the low precision; ``dtype``: the lowest precision the
    computation rounds to (default: ``got``'s dtype); ``square_magnitude``: optional, see the
    module docstring (used only for outputs of fewer than FEW elements). Shapes must match."""
    assert got.shape == want64.shape == torch_low.shape, (
        f"{name}: shapes differ: kernel {tuple(got.shape)}, float64 reference "
        f"{tuple(want64.shape)}, low-precision PyTorch {tuple(torch_low.shape)}")
    want64 = want64.detach().double()
    if want64.numel() == 0:
        return
    kernel_err = (got.detach().double() - want64).abs().max().item()
    torch_err = (torch_low.detach().double() - want64).abs().max().item()
    scale = want64.abs().max().item() or 1.0
    eps = torch.finfo(dtype or got.dtype).eps
    atol = (eps + ACCUMULATION_ULPS * FP32_EPS) * scale
    if square_magnitude is not None and want64.numel() < FEW:
        spread = square_magnitude.detach().double().abs().max().sqrt().item()
        atol = max(atol, FEW_SIGMAS * eps / (2 * 3 ** 0.5) * spread)
    bound = SLACK * torch_err + atol
    assert kernel_err <= bound, (
        f"{name}: kernel's max error {kernel_err:.3g} exceeds {SLACK:g} x PyTorch's "
        f"low-precision error {torch_err:.3g} + atol {atol:.3g} (largest |reference| {scale:.3g})")
