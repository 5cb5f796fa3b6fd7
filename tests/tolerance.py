"""The one tolerance rule of every kernel test: the library's (lowrank_fused/tolerance.py, which
the first-use check applies at run time too), asserted.

A kernel's output is compared with a float64 reference of the same computation; its largest
error may be at most twice the largest error PyTorch makes doing the same computation in the
low precision (the reference backend, or the same formula, run in the low dtypes), plus a small
atol relative to the largest reference value: one unit of rounding of the computation's lowest
precision, plus four of float32 for the kernels' own fp32 summation order (for small outputs where
PyTorch happens to round luckily, or gets the value exact). So a kernel may round differently
from PyTorch, but not worse.
"""
from lowrank_fused.tolerance import (  # noqa: F401  (the rule's constants, re-exported)
    ACCUMULATION_ULPS, FP32_EPS, SLACK, kernel_mismatch)


def assert_kernel_close(got, want64, torch_low, name="output", dtype=None):
    """``got``: the kernel's result; ``want64``: the float64 reference; ``torch_low``: the same
    computation done by PyTorch in the low precision; ``dtype``: the lowest precision the
    computation rounds to (default: ``got``'s dtype). Shapes must match."""
    assert got.shape == want64.shape == torch_low.shape, (
        f"{name}: shapes differ: kernel {tuple(got.shape)}, float64 reference "
        f"{tuple(want64.shape)}, low-precision PyTorch {tuple(torch_low.shape)}")
    message = kernel_mismatch(got, want64, torch_low, name, dtype)
    assert message is None, message
