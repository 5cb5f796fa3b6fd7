"""The one tolerance rule of every kernel test.

A kernel's output is compared with a float64 reference of the same computation; its largest
error may be at most twice the largest error PyTorch makes doing the same computation in the
low precision (the reference backend, or the same formula, run in the low dtypes), plus a small
atol relative to the largest reference value: one unit of rounding of the computation's lowest
precision, plus four of float32 for the kernels' own fp32 summation order (for small outputs where
PyTorch happens to round luckily, or gets the value exact). So a kernel may round differently
from PyTorch, but not worse.
"""
import torch

SLACK = 2.0  # kernel error / PyTorch's low-precision error
ACCUMULATION_ULPS = 4  # float32 units, for a summation order other than PyTorch's
FP32_EPS = torch.finfo(torch.float32).eps


def assert_kernel_close(got, want64, torch_low, name="output", dtype=None):
    """``got``: the kernel's result; ``want64``: the float64 reference; ``torch_low``: the same
    computation done by PyTorch in the low precision; ``dtype``: the lowest precision the
    computation rounds to (default: ``got``'s dtype). Shapes must match."""
    assert got.shape == want64.shape == torch_low.shape, (
        f"{name}: shapes differ: kernel {tuple(got.shape)}, float64 reference "
        f"{tuple(want64.shape)}, low-precision PyTorch {tuple(torch_low.shape)}")
    want64 = want64.detach().double()
    if want64.numel() == 0:
        return
    kernel_err = (got.detach().double() - want64).abs().max().item()
    torch_err = (torch_low.detach().double() - want64).abs().max().item()
    scale = want64.abs().max().item() or 1.0
    atol = (torch.finfo(dtype or got.dtype).eps + ACCUMULATION_ULPS * FP32_EPS) * scale
    bound = SLACK * torch_err + atol
    assert kernel_err <= bound, (
        f"{name}: kernel's max error {kernel_err:.3g} exceeds {SLACK:g} x PyTorch's "
        f"low-precision error {torch_err:.3g} + atol {atol:.3g} (largest |reference| {scale:.3g})")
