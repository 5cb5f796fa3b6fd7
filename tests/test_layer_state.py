"""LowRankLinear's state stays right: merge/unmerge restores W bit-for-bit, a merged layer refuses
re-initialisation, and a state_dict for another layout changes nothing (issue 14, items 2, 3)."""
import pytest
import torch
from torch import nn

from lowrank_fused import LowRankLinear

METHODS = ("lora", "lora_fa", "lora_xs")


def trained(layer, scale=0.5):
    """A large update (as after training), so merge/unmerge rounding shows in fp32."""
    with torch.no_grad():
        for p in (layer.lora_a, layer.lora_b, layer.latent):
            if p is not None:
                p.add_(torch.randn_like(p) * scale)
    return layer


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("method", METHODS)
def test_unmerge_restores_w_bit_for_bit(method, dtype):
    torch.manual_seed(0)
    linear = nn.Linear(64, 48, dtype=dtype)
    original = linear.weight.detach().clone()
    layer = trained(LowRankLinear.from_linear(linear, 8, method, alpha=16))
    for _ in range(3):
        layer.merge()
        assert not torch.equal(layer.weight, original)
        layer.unmerge()
        assert torch.equal(layer.weight, original)
    assert layer._weight_before_merge is None  # the copy lives only while merged


def test_merge_without_original_copy_subtracts():
    torch.manual_seed(0)
    layer = trained(LowRankLinear(64, 48, 8))
    original = layer.weight.detach().clone()
    layer.merge(keep_original=False)
    assert layer._weight_before_merge is None
    layer.unmerge()
    torch.testing.assert_close(layer.weight, original, rtol=0, atol=1e-5)


@pytest.mark.parametrize("reset", ["reset_adapters", "reset_parameters"])
@pytest.mark.parametrize("method", METHODS)
def test_merged_layer_refuses_reset(method, reset):
    torch.manual_seed(0)
    layer = trained(LowRankLinear(32, 24, 4, method=method))
    original = layer.weight.detach().clone()
    adapters = [p.detach().clone() for p in (layer.lora_a, layer.lora_b)]
    layer.merge()
    merged_w = layer.weight.detach().clone()
    with pytest.raises(RuntimeError, match=rf"LowRankLinear is merged: call unmerge\(\) before "
                                           rf"{reset}\(\)"):
        getattr(layer, reset)()
    assert torch.equal(layer.weight, merged_w) and layer.merged
    assert all(torch.equal(a, p) for a, p in zip(adapters, (layer.lora_a, layer.lora_b)))
    layer.unmerge()
    assert torch.equal(layer.weight, original)
    layer.reset_adapters()  # unmerged: allowed


def snapshot(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()
            if isinstance(v, torch.Tensor)}


def assert_unchanged(module, before):
    after = snapshot(module)
    assert after.keys() == before.keys()
    for key in before:
        assert torch.equal(after[key], before[key]), key


@pytest.mark.parametrize("src_kwargs, match", [
    (dict(rank=4, method="lora"), r"state_dict is for rank=4, this layer has rank=2"),
    (dict(rank=2, method="lora_fa"), r"state_dict is for method='lora_fa', this layer has "
                                     r"method='lora'"),
])
def test_mismatched_state_changes_nothing(src_kwargs, match):
    torch.manual_seed(0)
    src = trained(LowRankLinear(16, 12, src_kwargs["rank"], method=src_kwargs["method"]))
    dst = trained(LowRankLinear(16, 12, 2, method="lora"))
    before = snapshot(dst)
    with pytest.raises(RuntimeError, match=match) as info:
        dst.load_state_dict(src.state_dict())
    assert_unchanged(dst, before)
    assert not dst.merged
    if src_kwargs["rank"] != 2:  # PyTorch's own report reaches the user too
        assert "size mismatch for lora_a" in str(info.value)
        assert "size mismatch for lora_b" in str(info.value)


def test_mismatch_inside_a_model_leaves_that_layer_untouched():
    torch.manual_seed(0)
    src = nn.Sequential(LowRankLinear(16, 12, 4), nn.ReLU(), LowRankLinear(12, 8, 4))
    dst = nn.Sequential(LowRankLinear(16, 12, 4), nn.ReLU(), LowRankLinear(12, 8, 2))
    before = snapshot(dst[2])
    with pytest.raises(RuntimeError, match=r"(?s)rank=4, this layer has rank=2.*size mismatch for 2.lora_a"):
        dst.load_state_dict(src.state_dict(), strict=False)
    assert_unchanged(dst[2], before)


def test_merged_state_with_other_scaling_is_refused():
    torch.manual_seed(0)
    src = trained(LowRankLinear(16, 12, 2, alpha=4))
    src.merge()
    dst = LowRankLinear(16, 12, 2, alpha=8)
    before = snapshot(dst)
    with pytest.raises(RuntimeError, match=r"merged with scaling=2.0, this layer has scaling=4.0"):
        dst.load_state_dict(src.state_dict())
    assert_unchanged(dst, before)
    with pytest.raises(ValueError, match=r"'merged' must be a bool, got str 'yes'"):
        dst.set_extra_state({"method": "lora", "rank": 2, "scaling": 4.0, "merged": "yes"})


def test_loading_drops_a_stale_pre_merge_copy():
    torch.manual_seed(0)
    src = trained(LowRankLinear(16, 12, 2))
    dst = trained(LowRankLinear(16, 12, 2))
    dst.merge()
    dst.load_state_dict(src.state_dict())  # an unmerged state: W and the flag both come in
    assert not dst.merged and dst._weight_before_merge is None
    assert torch.equal(dst.weight, src.weight)
