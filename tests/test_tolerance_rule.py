"""The tolerance rule itself (lowrank_fused/tolerance.py): twice PyTorch's low-precision error
plus an atol; the atol scales with the terms of a cancelling sum when their size is given."""
import torch

from lowrank_fused.tolerance import kernel_mismatch


def _dot_case():
    # one fp32 dot whose terms cancel: the result is about 1/200 of the sum of |terms|
    torch.manual_seed(0)
    x = torch.randn(1, 70, dtype=torch.float64)
    a = torch.randn(70, 1, dtype=torch.float64)
    a[-1, 0] -= (x @ a).item() / x[0, -1].item() - 5e-3 / x[0, -1].item()
    want = x @ a
    terms = x.abs() @ a.abs()
    return want, terms


def test_an_error_the_size_of_the_terms_rounding_passes_only_when_the_terms_are_given():
    want, terms = _dot_case()
    assert terms.item() > 50 * want.abs().item()
    exact_torch = want.clone()  # PyTorch happened to round to the exact value
    got = want + 3 * torch.finfo(torch.float32).eps * terms  # three roundings of the terms
    assert kernel_mismatch(got, want, exact_torch, "dot", torch.float32) is not None
    assert kernel_mismatch(got, want, exact_torch, "dot", torch.float32, terms) is None


def test_a_wrong_result_fails_whatever_the_terms():
    want, terms = _dot_case()
    got = want + 1e-3 * terms  # far past any rounding of fp32
    message = kernel_mismatch(got, want, want, "dot", torch.float32, terms)
    assert message is not None and "of its terms" in message
