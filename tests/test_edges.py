"""Two edges found by trying bad inputs: double backward, and meta tensors on every backend."""
import os

import pytest
import torch

from lowrank_fused import DoubleBackwardError, LowRankLinear, low_rank_linear


def _tensors(dtype=torch.float64, device="cpu"):
    g = torch.Generator().manual_seed(0)
    t = lambda *s: torch.randn(*s, generator=g, dtype=dtype).to(device)  # noqa: E731
    return t(5, 8).requires_grad_(), t(6, 8), t(2, 8).requires_grad_(), t(6, 2).requires_grad_()


def _custom_op(x, w, a, b, dropout_p=0.0):
    """The custom ops' autograd formula (what torch.compile traces), called directly."""
    from lowrank_fused import ops
    seed = torch.tensor([3]) if dropout_p else None
    return ops.forward_op(x, w, None, a, b, None, 0.5, dropout_p, seed, "reference")[0]


def _eager(x, w, a, b, dropout_p=0.0):
    return low_rank_linear(x, w, a, b, backend="reference", dropout_p=dropout_p, dropout_seed=3)


@pytest.mark.parametrize("path", [_eager, _custom_op], ids=["eager", "custom-op"])
def test_double_backward_is_refused_not_wrong(path):
    x, w, a, b = _tensors()
    y = path(x, w, a, b, dropout_p=0.1)
    with pytest.raises(DoubleBackwardError, match="create_graph=True"):
        torch.autograd.grad(y.square().sum(), (x, a, b), create_graph=True)
    with pytest.raises(DoubleBackwardError):
        torch.autograd.gradgradcheck(lambda x, a, b: path(x, w, a, b), (x, a, b))


def test_first_order_gradients_are_unchanged_by_the_guard():
    x, w, a, b = _tensors()
    y = low_rank_linear(x, w, a, b, backend="reference")
    assert torch.autograd.gradcheck(
        lambda x, a, b: low_rank_linear(x, w, a, b, backend="reference"), (x, a, b))
    grads = torch.autograd.grad(y.sum(), (x, a, b))
    assert all(g is not None and not g.requires_grad for g in grads)


@pytest.mark.parametrize("backend", ["reference", "triton", "cuda", "auto"])
def test_meta_tensors_propagate_shapes_on_every_backend(backend, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", os.environ.get("TRITON_INTERPRET", "1"))
    x, w, a, b = (t.detach().to("meta").requires_grad_(t.requires_grad) for t in _tensors(
        torch.float32))
    y = low_rank_linear(x.view(1, 5, 8), w, a, b, backend=backend, dropout_p=0.1)
    assert y.shape == (1, 5, 6) and y.is_meta and y.dtype == torch.float32
    y.sum().backward()
    assert x.grad.shape == x.shape and a.grad.shape == a.shape and b.grad.shape == b.shape
    with torch.device("meta"):
        layer = LowRankLinear(8, 6, 2, backend=backend)
    assert layer(torch.empty(3, 8, device="meta")).shape == (3, 6)
