"""The one tolerance rule of every kernel test, asserted: the rule itself (its statement and
constants) is the library's, lowrank_fused/tolerance.py, which the first-use check applies at
run time too."""
from lowrank_fused.tolerance import (  # noqa: F401  (the rule's constants, re-exported)
    ACCUMULATION_ULPS, FP32_EPS, SLACK, kernel_mismatch)


def assert_kernel_close(got, want64, torch_low, name="output", dtype=None, magnitude=None):
    """``got``: the kernel's result; ``want64``: the float64 reference; ``torch_low``: the same
    computation done by PyTorch in the low precision; ``dtype``: the lowest precision the
    computation rounds to (default: ``got``'s dtype); ``magnitude``: the float64 computation on
    the inputs' absolute values (helpers.case_spec_magnitudes), where results may cancel.
    Shapes must match."""
    assert got.shape == want64.shape == torch_low.shape, (
        f"{name}: shapes differ: kernel {tuple(got.shape)}, float64 reference "
        f"{tuple(want64.shape)}, low-precision PyTorch {tuple(torch_low.shape)}")
    message = kernel_mismatch(got, want64, torch_low, name, dtype, magnitude)
    assert message is None, message
