"""LowRankLinear: drop-in for nn.Linear, from_linear, merge/unmerge/to_linear, state_dict."""
import io

import pytest
import torch
from torch import nn

from lowrank_fused import LowRankLinear

TRAINABLE_BY_METHOD = {"lora": {"lora_a", "lora_b"}, "lora_fa": {"lora_b"}, "lora_xs": {"latent"}}


def trained(layer):
    """Give the layer a non-zero update, as after some training."""
    with torch.no_grad():
        for p in (layer.lora_a, layer.lora_b, layer.latent):
            if p is not None:
                p.add_(torch.randn_like(p) * 0.1)
    return layer


@pytest.mark.parametrize("method", sorted(TRAINABLE_BY_METHOD))
def test_from_linear_reuses_weight_and_sets_trainables(method):
    linear = nn.Linear(24, 16, dtype=torch.float64)
    layer = LowRankLinear.from_linear(linear, 4, method, alpha=8)
    assert layer.weight is linear.weight and layer.bias is linear.bias
    assert not layer.weight.requires_grad and not layer.bias.requires_grad
    names = {n for n, p in layer.named_parameters() if p.requires_grad}
    assert names == TRAINABLE_BY_METHOD[method]
    assert layer.scaling == 2.0
    x = torch.randn(3, 24, dtype=torch.float64)
    if method != "lora_xs":  # B = 0: the layer starts as the base layer
        torch.testing.assert_close(layer(x), linear(x), rtol=0, atol=0)


def test_lora_xs_init_is_truncated_svd():
    linear = nn.Linear(20, 12, dtype=torch.float64)
    layer = LowRankLinear.from_linear(linear, 5, "lora_xs")
    u, s, vh = torch.linalg.svd(linear.weight.detach(), full_matrices=False)
    # B·A equals the best rank-5 approximation of W (sign-free check)
    torch.testing.assert_close(layer.lora_b @ layer.lora_a, u[:, :5] @ torch.diag(s[:5]) @ vh[:5])
    assert layer.latent.shape == (5, 5) and layer.latent.abs().max() < 1e-4


@pytest.mark.parametrize("method", sorted(TRAINABLE_BY_METHOD))
def test_merge_unmerge_to_linear(method):
    linear = nn.Linear(24, 16, dtype=torch.float64)
    original = linear.weight.detach().clone()
    layer = trained(LowRankLinear.from_linear(linear, 4, method, alpha=6))
    x = torch.randn(2, 3, 24, dtype=torch.float64)
    y = layer(x)
    plain = layer.to_linear()
    assert type(plain) is nn.Linear and plain.weight is not layer.weight
    torch.testing.assert_close(plain(x), y)
    layer.merge()
    assert layer.merged and "merged=True" in repr(layer)
    with pytest.warns(UserWarning, match="merged: its adapters get no gradient"):
        layer(x)
    torch.testing.assert_close(layer(x), y)
    torch.testing.assert_close(layer.to_linear()(x), y)
    with pytest.raises(RuntimeError, match="already merged"):
        layer.merge()
    layer.unmerge()
    torch.testing.assert_close(layer.weight, original)
    torch.testing.assert_close(layer(x), y)


def test_state_dict_round_trip():
    torch.manual_seed(0)
    src = trained(LowRankLinear(10, 6, 3, method="lora_xs", alpha=16))
    buffer = io.BytesIO()
    torch.save(src.state_dict(), buffer)
    buffer.seek(0)
    dst = LowRankLinear(10, 6, 3, method="lora_xs", alpha=16)
    dst.load_state_dict(torch.load(buffer))
    x = torch.randn(4, 10)
    torch.testing.assert_close(dst(x), src(x), rtol=0, atol=0)
    src.merge()
    src.eval()
    dst.eval()
    dst.load_state_dict(src.state_dict())
    assert dst.merged
    torch.testing.assert_close(dst(x), src(x), rtol=0, atol=0)
    with pytest.raises(RuntimeError, match="state_dict is for method='lora_xs'"):
        LowRankLinear(10, 6, 3, method="lora").load_state_dict(src.state_dict())


def test_repr_and_linear_interface():
    layer = LowRankLinear(10, 6, 3, method="lora_fa", dropout=0.1, bias=False)
    text = repr(layer)
    for part in ("in_features=10", "out_features=6", "rank=3", "method='lora_fa'",
                 "dropout=0.1", "bias=False"):
        assert part in text
    assert layer.in_features == 10 and layer.out_features == 6 and layer.bias is None
    assert layer(torch.randn(10)).shape == (6,)  # 1-D input, as nn.Linear


def test_half_base_keeps_fp32_adapters_by_default():
    layer = LowRankLinear(8, 4, 2, dtype=torch.bfloat16)
    assert layer.lora_a.dtype == layer.lora_b.dtype == torch.float32
    y = layer(torch.randn(3, 8, dtype=torch.bfloat16))
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert layer.lora_b.grad.dtype == torch.float32


def test_rslora_scaling():
    assert LowRankLinear(8, 8, 4, alpha=8, use_rslora=True).scaling == 4.0
    assert LowRankLinear(8, 8, 4).scaling == 1.0
