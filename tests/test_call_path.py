"""The eager call path: the same results as the custom ops, checks cached on shapes only, no
seed drawn without dropout."""
import pytest
import torch

from lowrank_fused import functional, ops
from lowrank_fused.functional import low_rank_linear


def _inputs(m=6, k=12, n=10, r=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(n, k, generator=g, dtype=torch.float64)
    bias = torch.randn(n, generator=g, dtype=torch.float64, requires_grad=True)
    a = torch.randn(r, k, generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.randn(n, r, generator=g, dtype=torch.float64, requires_grad=True)
    lat = torch.randn(r, r, generator=g, dtype=torch.float64, requires_grad=True)
    return x, w, bias, a, b, lat


@pytest.mark.parametrize("dropout_p", [0.0, 0.3])
def test_eager_path_matches_the_custom_ops(dropout_p):
    x, w, bias, a, b, lat = _inputs()
    grad = torch.randn(6, 10, dtype=torch.float64)
    y = low_rank_linear(x, w, a, b, bias=bias, latent=lat, scaling=0.7, dropout_p=dropout_p,
                        backend="reference", dropout_seed=11)
    eager = [y] + list(torch.autograd.grad(y, (x, bias, a, b, lat), grad))
    seed = torch.tensor([11], dtype=torch.int64) if dropout_p else None
    y_op = ops.forward_op(x, w, bias, a, b, lat, 0.7, dropout_p, seed, "reference")[0]
    custom = [y_op] + list(torch.autograd.grad(y_op, (x, bias, a, b, lat), grad))
    for got, want in zip(eager, custom):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_eager_calls_do_not_go_through_the_custom_op(monkeypatch):
    def fail(*args):
        raise AssertionError("eager call went through the custom op")
    monkeypatch.setattr(functional, "forward_op", fail)
    x, w, bias, a, b, _ = _inputs()
    low_rank_linear(x, w, a, b, backend="reference").sum().backward()
    with torch.no_grad():
        low_rank_linear(x, w, a, b, backend="reference")


def test_no_seed_without_dropout(monkeypatch):
    def fail(*args):
        raise AssertionError("a seed was drawn without dropout")
    monkeypatch.setattr(functional, "seed_tensor", fail)
    x, w, bias, a, b, _ = _inputs()
    low_rank_linear(x, w, a, b, dropout_p=0.0, backend="reference")
    low_rank_linear(x, w, a, b, dropout_p=0.5, training=False, backend="reference")


def test_checks_are_cached_on_shapes_not_on_tensors():
    x, w, bias, a, b, _ = _inputs(seed=3)
    low_rank_linear(x, w, a, b, backend="reference")
    low_rank_linear(x, w, a, b, backend="reference")  # same signature: no new check
    with pytest.raises(ValueError, match="lora_b must have shape"):
        low_rank_linear(x, w, a, b[:, :2], backend="reference")
    with pytest.raises(TypeError, match="share a dtype"):
        low_rank_linear(x.float(), w, a, b, backend="reference")
    with pytest.raises(ValueError, match="dropout"):
        low_rank_linear(x, w, a, b, dropout_p=1.0, backend="reference")
    with pytest.raises(ValueError, match="one device"):
        low_rank_linear(x, w.to("meta"), a, b, backend="reference")
