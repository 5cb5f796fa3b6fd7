"""The spec (lowrank_fused.spec) against autograd of its own forward, and its DoRA rule (and plain
LoRA) against PEFT's own layers, in float64."""
import pytest
import torch
from torch import nn

from lowrank_fused import spec
from lowrank_fused.dropout import quantised_p

K, N, R = 11, 9, 4
TIGHT = dict(rtol=1e-12, atol=1e-12)


def _leaves(lead, *, latent, bias, dora, seed=0):
    g = torch.Generator().manual_seed(seed)

    def t(*shape, scale=1.0, shift=0.0):
        v = torch.randn(*shape, generator=g, dtype=torch.float64) * scale + shift
        return v.requires_grad_()

    return dict(x=t(*lead, K), weight=t(N, K, scale=K ** -0.5), lora_a=t(R, K, scale=K ** -0.5),
                lora_b=t(N, R, scale=R ** -0.5), bias=t(N) if bias else None,
                latent=t(R, R, scale=R ** -0.5) if latent else None,
                magnitude=t(N, scale=0.2, shift=1.0) if dora else None)


GRAD_OF = dict(x="dx", weight="dw", lora_a="da", lora_b="db", latent="dr", bias="dbias",
               magnitude="dm")


@pytest.mark.parametrize("lead", [(7,), (2, 5)], ids=["2d", "3d"])
@pytest.mark.parametrize("dora", [False, True], ids=["plain", "dora"])
@pytest.mark.parametrize("p", [0.0, 0.3], ids=["no_dropout", "dropout"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no_bias"])
@pytest.mark.parametrize("method", ["lora", "lora_fa", "lora_xs"])
def test_explicit_gradients_equal_autograd_of_the_forward(method, bias, p, dora, lead):
    """Every explicit gradient (x, W, A, B, R, bias, m) equals autograd's through ``forward``
    (which detaches DoRA's norm, as the definition does)."""
    t = _leaves(lead, latent=method == "lora_xs", bias=bias, dora=dora)
    keep = spec.keep_mask(t["x"].shape, 5, p) if p else None
    if p:
        assert 0 < int(keep.sum()) < keep.numel()
    kwargs = dict(bias=t["bias"], latent=t["latent"], scaling=0.7, magnitude=t["magnitude"],
                  keep=keep, dropout_p=p)
    y, _ = spec.forward(t["x"], t["weight"], t["lora_a"], t["lora_b"], **kwargs)
    assert y.shape == (*lead, N)
    grad_y = torch.randn(y.shape, generator=torch.Generator().manual_seed(1), dtype=y.dtype)
    present = {name: v for name, v in t.items() if v is not None}
    want = dict(zip(present, torch.autograd.grad(y, list(present.values()), grad_y)))
    got = spec.backward(grad_y, *(t[n].detach() for n in ("x", "weight", "lora_a", "lora_b")),
                        **{k: v.detach() if torch.is_tensor(v) and k != "keep" else v
                           for k, v in kwargs.items()})
    for name, field in GRAD_OF.items():
        explicit = getattr(got, field)
        if name not in present:
            assert explicit is None, field
            continue
        assert explicit.shape == present[name].shape, field
        torch.testing.assert_close(explicit, want[name], **TIGHT, msg=field)


def test_without_dropout_or_magnitude_the_rules_agree():
    """DoRA with m = ‖W + s·B·A‖ (c = 1) is the plain operator; a keep-mask of all ones with
    p = 0 is no dropout."""
    t = _leaves((6,), latent=True, bias=True, dora=False)
    args = [t[n].detach() for n in ("x", "weight", "lora_a", "lora_b")]
    b_eff = t["lora_b"].detach() @ t["latent"].detach().T
    m = spec.row_norm(args[1], args[2], b_eff, 0.5)
    plain, _ = spec.forward(*args, bias=t["bias"].detach(), latent=t["latent"].detach(),
                            scaling=0.5)
    dora, _ = spec.forward(*args, bias=t["bias"].detach(), latent=t["latent"].detach(),
                           scaling=0.5, magnitude=m, keep=torch.ones(6, K, dtype=torch.bool))
    torch.testing.assert_close(dora, plain, **TIGHT)


def test_refuses_mixed_dtypes():
    t = _leaves((3,), latent=False, bias=False, dora=False)
    with pytest.raises(TypeError, match="one dtype"):
        spec.forward(t["x"].float(), t["weight"], t["lora_a"], t["lora_b"])


# ---- PEFT's own layers (LoRA and DoRA) in float64, under the same keep-mask ----

peft = pytest.importorskip("peft", reason="the peft package is not installed")


class _SameMask(nn.Module):
    """Stands in for PEFT's lora_dropout: x ⊙ keep / (1 − q), the spec's dropout."""

    def __init__(self, keep, p):
        super().__init__()
        self.keep, self.p = keep, p

    def forward(self, t):
        return t * self.keep.to(t.dtype) / (1.0 - quantised_p(self.p))


def _peft_layer(dora, bias, p):
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(K, N, bias=bias, dtype=torch.float64))
    config = peft.LoraConfig(r=R, lora_alpha=2 * R + 1, target_modules=["0"], use_dora=dora,
                             lora_dropout=p)
    layer = peft.get_peft_model(base, config).base_model.model[0]
    with torch.no_grad():
        layer.lora_B["default"].weight.normal_(0, 0.3)   # a non-zero update
        if dora:                                         # and c − 1 not zero
            layer.lora_magnitude_vector["default"].weight.mul_(
                torch.rand(N, dtype=torch.float64) + 0.5)
    if bias:
        layer.base_layer.bias.requires_grad_(True)
    return layer


@pytest.mark.parametrize("lead", [(7,), (2, 5)], ids=["2d", "3d"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no_bias"])
@pytest.mark.parametrize("p", [0.0, 0.3], ids=["no_dropout", "dropout"])
@pytest.mark.parametrize("dora", [True, False], ids=["dora", "lora"])
def test_equals_peft(dora, p, bias, lead):
    layer = _peft_layer(dora, bias, p)
    x = torch.randn(*lead, K, dtype=torch.float64, requires_grad=True)
    keep = spec.keep_mask(x.shape, 17, p) if p else None
    if p:
        layer.lora_dropout["default"] = _SameMask(keep, p)
    y_peft = layer(x)
    grad_y = torch.randn_like(y_peft)
    params = dict(x=x, lora_a=layer.lora_A["default"].weight,
                  lora_b=layer.lora_B["default"].weight)
    if dora:
        params["magnitude"] = layer.lora_magnitude_vector["default"].weight
    if bias:
        params["bias"] = layer.base_layer.bias
    want = dict(zip(params, torch.autograd.grad(y_peft, list(params.values()), grad_y)))

    kwargs = dict(bias=None if not bias else layer.base_layer.bias.detach(),
                  scaling=layer.scaling["default"], keep=keep, dropout_p=p,
                  magnitude=params["magnitude"].detach() if dora else None)
    tensors = (x.detach(), layer.base_layer.weight.detach(), params["lora_a"].detach(),
               params["lora_b"].detach())
    y, _ = spec.forward(*tensors, **kwargs)
    torch.testing.assert_close(y, y_peft.detach(), **TIGHT)
    got = spec.backward(grad_y, *tensors, **kwargs)
    for name in params:
        torch.testing.assert_close(getattr(got, GRAD_OF[name]), want[name], **TIGHT, msg=name)


def test_dora_in_eval_is_peft_without_dropout():
    layer = _peft_layer(True, True, 0.3).eval()   # PEFT's DoRA skips its dropout in eval
    x = torch.randn(6, K, dtype=torch.float64)
    y, _ = spec.forward(x, layer.base_layer.weight.detach(),
                        layer.lora_A["default"].weight.detach(),
                        layer.lora_B["default"].weight.detach(),
                        bias=layer.base_layer.bias.detach(), scaling=layer.scaling["default"],
                        magnitude=layer.lora_magnitude_vector["default"].weight.detach())
    with torch.no_grad():
        torch.testing.assert_close(y, layer(x), **TIGHT)
