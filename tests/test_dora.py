"""DoRA (``magnitude=``): the factored row norm and its cache, and the operator against the spec
(lowrank_fused.spec: PEFT's rule, dense, in float64) for y and every gradient."""
import pytest
import torch

import lowrank_fused as lf
from helpers import spec_results
from lowrank_fused import dora, spec
from lowrank_fused.saved_activations import SavedActivations


def _dense_norm64(w, a, b, s):
    return spec.row_norm(w.double(), a.double(), b.double(), s)


def test_row_norm_matches_float64_dense():
    torch.manual_seed(0)
    w, a, b = torch.randn(48, 96), torch.randn(8, 96) * 0.1, torch.randn(48, 8) * 0.1
    got = dora.row_norm(w, a, b, 2.0)
    assert got.dtype == torch.float32
    want = _dense_norm64(w, a, b, 2.0)
    assert ((got.double() - want).abs() / want).max() < 1e-6


def test_row_norm_under_cancellation():
    """B·A close to −W on some rows: the factored sum cancels; those rows are recomputed."""
    torch.manual_seed(1)
    n, k, r, s = 32, 64, 16, 0.5
    a = torch.randn(r, k)
    b = torch.randn(n, r)
    w = -s * (b @ a)
    w[::2] += 1e-3 * torch.randn(n // 2, k)       # ‖W_n + s·b_n·A‖ ~ 1e-4 ‖W_n‖ on even rows
    w[1::2] = torch.randn(n // 2, k)
    got = dora.row_norm(w, a, b, s).double()
    want = _dense_norm64(w, a, b, s)
    rel = (got - want).abs() / want
    assert rel.max() < 1e-3, rel.max()
    # without the dense fallback the factored sum alone is far off on the cancelling rows
    old = dora.CANCEL_RATIO
    try:
        dora.CANCEL_RATIO = 0.0
        plain = dora.row_norm(w, a, b, s).double()
    finally:
        dora.CANCEL_RATIO = old
    assert ((plain - want).abs() / want)[::2].max() > 1e-2


def test_norm_follows_in_place_writes():
    torch.manual_seed(2)
    w, a, b = torch.randn(16, 32), torch.randn(4, 32), torch.randn(16, 4)
    before = dora.row_norm(w, a, b, 1.0)
    with torch.no_grad():
        w.mul_(2.0)
        a.add_(1.0)
    after = dora.row_norm(w, a, b, 1.0)
    torch.testing.assert_close(after.double(), _dense_norm64(w, a, b, 1.0), rtol=1e-5, atol=0)
    assert not torch.allclose(before, after)


GRADIENT_ORDER = ("x", "lora_a", "lora_b", "magnitude", "bias", "latent")


def _spec64(x, w, bias, a, b, m, s, g=None, p=0.0, seed=None, latent=None):
    """The spec in float64 (PEFT's DoRA rule, the project's mask for ``seed``): y, and for ∂L/∂y
    = ``g`` the gradients of (x, a, b, m, bias, latent), None where a tensor needs none."""
    tensors = dict(x=x, weight=w, lora_a=a, lora_b=b, bias=bias, latent=latent, magnitude=m)
    out = spec_results(tensors, g, scaling=s, p=p, seed=seed)
    return out["y"], [out.get(name) for name in GRADIENT_ORDER]


def _case(method, dropout, three_d=False, dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    n, k, r = 24, 40, 4
    shape = (2, 5, k) if three_d else (9, k)
    x = torch.randn(*shape, dtype=dtype, requires_grad=True)
    w = torch.randn(n, k, dtype=dtype)
    bias = torch.randn(n, dtype=dtype, requires_grad=True)
    a = (torch.randn(r, k) * 0.2).requires_grad_(method == "lora")
    b = (torch.randn(n, r) * 0.2).requires_grad_(method != "lora_xs")
    latent = (torch.randn(r, r) * 0.3).requires_grad_() if method == "lora_xs" else None
    m = (torch.rand(n) + 0.5).requires_grad_()
    return x, w, bias, a, b, latent, m


@pytest.mark.parametrize("three_d", [False, True])
@pytest.mark.parametrize("dropout", [0.0, 0.3])
@pytest.mark.parametrize("method", ["lora", "lora_fa", "lora_xs"])
def test_operator_matches_dense_float64(method, dropout, three_d):
    x, w, bias, a, b, latent, m = _case(method, dropout, three_d)
    s, seed = 1.5, 1234
    y = lf.low_rank_linear(x, w, a, b, bias=bias, latent=latent, scaling=s, dropout_p=dropout,
                           dropout_seed=seed, magnitude=m)
    g = torch.randn(*x.shape[:-1], w.shape[0], dtype=torch.float64)
    want, grads = _spec64(x, w, bias, a, b, m, s, g, dropout, seed, latent)
    torch.testing.assert_close(y.double(), want, rtol=1e-5, atol=1e-5)
    y.backward(g.to(y.dtype))
    for ours, ref in zip((x, a, b, m, bias, latent), grads):
        if ours is None or not ours.requires_grad:
            continue
        assert ours.grad is not None
        torch.testing.assert_close(ours.grad.double(), ref, rtol=1e-4, atol=1e-4)


def _run_operator(x, w, bias, a, b, m, s, dropout, seed, g):
    """y and the gradients (x, a, b, m, bias) of one DoRA call on fresh leaves."""
    leaves = [t.detach().clone().requires_grad_(t.requires_grad) if t is not None else None
              for t in (x, a, b, m, bias)]
    x_, a_, b_, m_, bias_ = leaves
    y = lf.low_rank_linear(x_, w, a_, b_, bias=bias_, scaling=s, dropout_p=dropout,
                           dropout_seed=seed, magnitude=m_)
    y.backward(g.to(y.dtype))
    return y.detach(), [None if t is None or not t.requires_grad else t.grad for t in leaves]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("with_bias", [True, False])
@pytest.mark.parametrize("dropout", [0.0, 0.3])
@pytest.mark.parametrize("method", ["lora", "lora_fa"])
def test_row_chunks_match_float64(monkeypatch, method, dropout, with_bias, dtype):
    """The reference path's M x N passes run over row chunks (_CHUNK_ELEMENTS): a budget of a
    row or two per chunk (uneven last chunk) gives the unchunked result to rounding, the float64
    formula, and the same gradients (the fold of c into W's and B's rows included)."""
    from lowrank_fused.backends import pytorch as reference

    x, w, bias, a, b, latent, m = _case(method, dropout, dtype=dtype)
    bias = bias if with_bias else None
    s, seed = 1.5, 77
    g = torch.randn(x.shape[0], w.shape[0], dtype=torch.float64)
    y_whole, grads_whole = _run_operator(x, w, bias, a, b, m, s, dropout, seed, g)
    monkeypatch.setattr(reference, "_CHUNK_ELEMENTS", 2 * w.shape[0] - 1)  # 1 row per chunk
    chunks = list(reference._row_chunks(x.shape[0], w.shape[0]))
    assert len(chunks) == x.shape[0]
    y_rows, grads_rows = _run_operator(x, w, bias, a, b, m, s, dropout, seed, g)
    monkeypatch.setattr(reference, "_CHUNK_ELEMENTS", 4 * w.shape[0])      # 4, 4, 1 rows
    y_four, grads_four = _run_operator(x, w, bias, a, b, m, s, dropout, seed, g)
    tight = dict(rtol=1e-6, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-2, atol=1e-2)
    for y in (y_rows, y_four):
        torch.testing.assert_close(y.double(), y_whole.double(), **tight)
    want, grads = _spec64(x, w, bias, a, b, m, s, g, dropout, seed)
    # bf16: y rounds the base term x·Wᵀ (|y| up to about 8, ulp 2**-5) and then the sum
    loose = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=7e-2)
    torch.testing.assert_close(y_rows.double(), want, **loose)
    for whole, rows, four, ref in zip(grads_whole, grads_rows, grads_four, grads):
        if whole is None:
            assert rows is None and four is None
            continue
        torch.testing.assert_close(rows.double(), whole.double(), **tight)
        torch.testing.assert_close(four.double(), whole.double(), **tight)
        grad_tol = dict(rtol=1e-4, atol=1e-4) if dtype == torch.float32 else loose
        torch.testing.assert_close(rows.double(), ref, **grad_tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("with_bias", [True, False])
@pytest.mark.parametrize("dropout", [0.05, 0.3])
@pytest.mark.parametrize("method", ["lora", "lora_fa"])
def test_sparse_dropout_matches_dense_path(monkeypatch, method, dropout, with_bias, dtype):
    """At a small dropout rate the reference path takes x̃·Wᵀ = scale·(x·Wᵀ − D·Wᵀ) with the
    dropped entries D sparse, and dx's dropped term as a sampled product: the same outputs and
    gradients as the dense path (forced either way here) and as the float64 formula."""
    from lowrank_fused.backends import pytorch as reference

    x, w, bias, a, b, latent, m = _case(method, dropout, dtype=dtype)
    x = torch.randn(64, x.shape[1], dtype=dtype, requires_grad=True)  # some rows drop nothing
    bias = bias if with_bias else None
    s, seed = 1.5, 91
    g = torch.randn(x.shape[0], w.shape[0], dtype=torch.float64)
    taken = []
    real = reference._dora_forward_sparse
    monkeypatch.setattr(reference, "_dora_forward_sparse",
                        lambda *args: taken.append(1) or real(*args))
    if dropout > reference._SPARSE_DROPOUT_MAX_P:
        monkeypatch.setattr(reference, "_SPARSE_DROPOUT_MAX_P", 1.0)
    y_sparse, grads_sparse = _run_operator(x, w, bias, a, b, m, s, dropout, seed, g)
    assert taken
    monkeypatch.setattr(reference, "_SPARSE_DROPOUT_MAX_P", -1.0)
    y_dense, grads_dense = _run_operator(x, w, bias, a, b, m, s, dropout, seed, g)
    assert len(taken) == 1
    keep = spec.keep_mask(x.shape, seed, dropout)
    assert 0 < (~keep).sum() < keep.numel()
    want, grads = _spec64(x, w, bias, a, b, m, s, g, dropout, seed)
    if dtype == torch.bfloat16:
        tol, grad_tol = dict(rtol=2e-2, atol=7e-2), dict(rtol=2e-2, atol=7e-2)
    else:
        tol, grad_tol = dict(rtol=1e-5, atol=1e-5), dict(rtol=1e-4, atol=1e-4)
    for y in (y_sparse, y_dense):
        torch.testing.assert_close(y.double(), want, **tol)
    torch.testing.assert_close(y_sparse, y_dense, **tol)
    for sparse, dense, ref in zip(grads_sparse, grads_dense, grads):
        if sparse is None:
            assert dense is None
            continue
        torch.testing.assert_close(sparse.double(), ref, **grad_tol)
        torch.testing.assert_close(dense.double(), ref, **grad_tol)


def test_eval_ignores_dropout():
    x, w, bias, a, b, latent, m = _case("lora", 0.3)
    y = lf.low_rank_linear(x, w, a, b, bias=bias, scaling=2.0, dropout_p=0.3, training=False,
                           magnitude=m)
    want, _ = _spec64(x, w, bias, a, b, m, 2.0)
    torch.testing.assert_close(y.double(), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dropout", [0.0, 0.3])
@pytest.mark.parametrize("method", ["lora", "lora_fa"])
def test_saved_bytes(method, dropout):
    """A frozen: P plus one M x N tensor (for dm) and never x; A trainable: x as well."""
    x, w, bias, a, b, latent, m = _case(method, dropout)
    x = x.detach()        # a leaf input that needs no grad: anything saved is the operator's
    with SavedActivations() as saved:
        y = lf.low_rank_linear(x, w, a, b, bias=bias, scaling=1.0, dropout_p=dropout,
                               magnitude=m)
    mm, nn_ = x.shape[0], w.shape[0]
    expected = mm * a.shape[0] * 4 + mm * nn_ * 4 + (x.numel() * 4 if method == "lora" else 0)
    tensors = [t for t in saved.tensors if t.dim() == 2 and t.shape[0] == mm]
    assert sum(t.numel() * t.element_size() for t in tensors) == expected
    assert any(t.data_ptr() == x.data_ptr() for t in saved.tensors) == (method == "lora")
    y.sum().backward()


@pytest.mark.parametrize("method", ["lora", "lora_fa"])
def test_no_bias_no_dropout_keeps_y_for_dm(method):
    """Z = y / c: the output itself is kept, no M x N tensor of its own; gradients unchanged."""
    x, w, bias, a, b, latent, m = _case(method, 0.0)
    with SavedActivations() as saved:
        y = lf.low_rank_linear(x, w, a, b, scaling=1.5, magnitude=m)
    big = [t for t in saved.tensors if t.dim() == 2 and t.shape == y.shape]
    assert big and all(t.untyped_storage().data_ptr() == y.untyped_storage().data_ptr()
                       for t in big)
    g = torch.randn(*y.shape, dtype=torch.float64)
    want, grads = _spec64(x, w, None, a, b, m, 1.5, g)
    y.backward(g.float())
    for ours, ref in zip((x, a, b, m), grads):
        if ours.requires_grad:
            torch.testing.assert_close(ours.grad.double(), ref, rtol=1e-4, atol=1e-4)
    # a zero magnitude entry (c = 0) keeps Z instead, and dm there is still right
    x.grad = m.grad = None
    with torch.no_grad():
        m[3] = 0.0
    y = lf.low_rank_linear(x, w, a, b, scaling=1.5, magnitude=m)
    want, grads = _spec64(x, w, None, a, b, m, 1.5, g)
    y.backward(g.float())
    torch.testing.assert_close(m.grad.double(), grads[3], rtol=1e-4, atol=1e-4)


def test_saved_without_trainable_magnitude_has_no_m_by_n():
    x, w, bias, a, b, latent, m = _case("lora_fa", 0.0)
    m.requires_grad_(False)
    with SavedActivations() as saved:
        lf.low_rank_linear(x.detach(), w, a, b, magnitude=m)
    assert all(t.shape[-1] != w.shape[0] or t.dim() != 2 for t in saved.tensors)


def test_routes_other_backends_to_reference():
    x, w, bias, a, b, latent, m = _case("lora_fa", 0.0)
    y_ref = lf.low_rank_linear(x, w, a, b, magnitude=m, backend="reference")
    y_auto = lf.low_rank_linear(x, w, a, b, magnitude=m, backend="auto")
    torch.testing.assert_close(y_ref, y_auto, rtol=0, atol=0)
    from lowrank_fused import dispatch
    assert dispatch.select("auto", torch.device("cpu"), dora=True).NAME == "reference"


@pytest.mark.parametrize("bad, err", [
    (torch.ones(7), ValueError),
    (torch.ones(24, dtype=torch.float64), TypeError),
    (torch.ones(24, dtype=torch.int64), TypeError),
    ([1.0] * 24, TypeError),
    (torch.ones(24, device="meta"), ValueError),
])
def test_bad_magnitude(bad, err):
    x, w, bias, a, b, latent, m = _case("lora_fa", 0.0)
    with pytest.raises(err, match="magnitude"):
        lf.low_rank_linear(x, w, a, b, magnitude=bad)


def test_bf16_base_close_to_float64():
    x, w, bias, a, b, latent, m = _case("lora", 0.0, dtype=torch.bfloat16)
    y = lf.low_rank_linear(x, w, a, b, bias=bias, magnitude=m)
    assert y.dtype == torch.bfloat16
    want, _ = _spec64(x, w, bias, a, b, m, 1.0)
    torch.testing.assert_close(y.double(), want, rtol=2e-2, atol=2e-2)
    y.float().sum().backward()
    assert m.grad.dtype == torch.float32 and x.grad.dtype == torch.bfloat16


# --- LowRankLinear(dora=True) ---------------------------------------------------------------

def _dora_layer(method="lora", dropout=0.0, dtype=torch.float32):
    torch.manual_seed(3)
    base = torch.nn.Linear(40, 24, dtype=dtype)
    layer = lf.LowRankLinear.from_linear(base, 4, method, alpha=8, dropout=dropout, dora=True)
    with torch.no_grad():
        layer.lora_b.normal_(0, 0.3)           # a non-zero update
        layer.magnitude.mul_(torch.rand(24, dtype=layer.magnitude.dtype) + 0.5)
    return layer


def test_layer_init_magnitude_is_peft_norm():
    torch.manual_seed(4)
    base = torch.nn.Linear(40, 24)
    layer = lf.LowRankLinear.from_linear(base, 4, "lora_fa", dora=True)
    torch.testing.assert_close(layer.magnitude.detach(), base.weight.detach().norm(dim=1))
    assert layer.magnitude.requires_grad and not layer.lora_a.requires_grad
    x = torch.randn(3, 40)
    torch.testing.assert_close(layer(x), base(x))  # B = 0, m = ‖W‖: the base layer


@pytest.mark.parametrize("method", ["lora", "lora_fa"])
def test_layer_forward_backward_matches_dense(method):
    layer = _dora_layer(method)
    x = torch.randn(2, 3, 40, requires_grad=True)
    y = layer(x)
    want, grads = _spec64(x, layer.weight, layer.bias, layer.lora_a, layer.lora_b,
                          layer.magnitude, layer.scaling, torch.ones(*y.shape, dtype=torch.float64))
    torch.testing.assert_close(y.double(), want, rtol=1e-5, atol=1e-5)
    y.sum().backward()
    torch.testing.assert_close(layer.magnitude.grad.double(), grads[3], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(layer.lora_b.grad.double(), grads[2], rtol=1e-4, atol=1e-4)
    assert (layer.lora_a.grad is not None) == (method == "lora")


def test_layer_merge_unmerge_to_linear():
    layer = _dora_layer("lora").eval()
    x = torch.randn(5, 40)
    y = layer(x)
    w0 = layer.weight.detach().clone()
    lin = layer.to_linear()
    torch.testing.assert_close(lin(x), y, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(layer.weight + layer.delta_weight(), lin.weight)
    layer.merge()
    torch.testing.assert_close(layer(x), y, rtol=1e-5, atol=1e-5)
    layer.unmerge()
    assert torch.equal(layer.weight, w0)
    layer.merge(keep_original=False)
    layer.unmerge()
    torch.testing.assert_close(layer.weight, w0, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(layer(x), y, rtol=1e-5, atol=1e-5)


def test_layer_state_dict_round_trip_and_mismatch():
    layer = _dora_layer("lora_fa")
    state = layer.state_dict()
    assert "magnitude" in state
    other = lf.LowRankLinear(40, 24, 4, method="lora_fa", alpha=8, dora=True)
    other.load_state_dict(state)
    x = torch.randn(3, 40)
    torch.testing.assert_close(other(x), layer(x))
    plain = lf.LowRankLinear(40, 24, 4, method="lora_fa", alpha=8)
    with pytest.raises(RuntimeError, match="dora"):
        plain.load_state_dict(state)
    merged = _dora_layer("lora_fa")
    merged.merge()
    loaded = lf.LowRankLinear(40, 24, 4, method="lora_fa", alpha=8, dora=True)
    loaded.load_state_dict(merged.state_dict())
    with pytest.raises(RuntimeError, match="loaded merged"):
        loaded.unmerge()


def test_layer_dora_refusals():
    with pytest.raises(ValueError, match="lora_xs|LoRA-XS"):
        lf.LowRankLinear(40, 24, 4, method="lora_xs", dora=True)
    with pytest.raises(TypeError, match="dora"):
        lf.LowRankLinear(40, 24, 4, dora="yes")


def test_meta_tensors_propagate_shapes():
    x, w, bias, a, b, latent, m = (t.detach().to("meta").requires_grad_(t.requires_grad)
                                   if t is not None else None for t in _case("lora", 0.0))
    y = lf.low_rank_linear(x, w, a, b, bias=bias, magnitude=m)
    assert y.shape == (9, 24) and y.is_meta


def test_merged_dora_layer_refuses_delta_weight():
    layer = _dora_layer("lora")
    layer.merge()
    with pytest.raises(RuntimeError, match="unmerge"):
        layer.delta_weight()


@pytest.mark.parametrize("dropout", [0.0, 0.05, 0.3])
def test_bf16_gemms_upcast_or_native_agree(monkeypatch, dropout):
    """On a CPU without oneDNN bf16 kernels the reference DoRA path runs its bf16 GEMMs as fp32
    GEMMs of the upcast operands; with native bf16 GEMMs (forced here) the results agree to
    bf16 rounding, outputs and gradients."""
    from lowrank_fused.backends import pytorch as reference

    x, w, bias, a, b, latent, m = _case("lora", dropout, dtype=torch.bfloat16)
    x = torch.randn(64, x.shape[1], dtype=torch.bfloat16, requires_grad=True)
    g = torch.randn(x.shape[0], w.shape[0], dtype=torch.float64)
    results = []
    for native in (False, True):
        monkeypatch.setitem(reference._NATIVE_16BIT, torch.bfloat16, native)
        assert reference._gemm_dtype(x) == (torch.bfloat16 if native else torch.float32)
        results.append(_run_operator(x, w, None, a, b, m, 1.5, dropout, 5, g))
    (y0, g0), (y1, g1) = results
    torch.testing.assert_close(y0.double(), y1.double(), rtol=2e-2, atol=7e-2)
    for u, v in zip(g0, g1):
        if u is not None:
            torch.testing.assert_close(u.double(), v.double(), rtol=2e-2, atol=7e-2)
