"""DoRA keeps no state a user's write can leave stale (issue 29, item 5), and tolerates an
in-place op on its output as plain PEFT does (issue 29, item 6)."""
import copy

import pytest
import torch
from torch import nn

import lowrank_fused as lf
from lowrank_fused.errors import InplaceOutputError

peft = pytest.importorskip("peft")
from peft import LoraConfig, get_peft_model  # noqa: E402

from lowrank_fused import peft as lfp  # noqa: E402
from peft_helpers import nonzero_b  # noqa: E402

K, N, R = 24, 16, 4


def dora64(x, weight, bias, lora_a, lora_b, magnitude, scaling):
    """The spec in float64: c = m / ‖W + s·B·A‖_row, y = c ⊙ (x·Wᵀ + s·x·Aᵀ·Bᵀ) + bias."""
    x, w, a, b, m = (t.detach().double() for t in (x, weight, lora_a, lora_b, magnitude))
    c = m / (w + scaling * b @ a).norm(dim=1)
    y = c * (x @ w.T + scaling * (x @ a.T) @ b.T)
    return y if bias is None else y + bias.detach().double()


def _layer(method="lora_fa"):
    torch.manual_seed(0)
    layer = lf.LowRankLinear(K, N, R, method=method, dora=True, alpha=8)
    with torch.no_grad():
        layer.lora_b.normal_(0, 0.3)
        layer.magnitude.mul_(torch.rand(N) + 0.5)
    return layer


def _write(layer, how, new_w, new_a):
    """Write W and (frozen) A by ``how``; none of the .data writes bumps a version counter."""
    if how == "data_mul":
        layer.weight.data.mul_(2.0)
        layer.lora_a.data.mul_(-0.5)
    elif how == "data_copy":
        layer.weight.data.copy_(new_w)
        layer.lora_a.data.copy_(new_a)
    elif how == "copy_under_no_grad":
        with torch.no_grad():
            layer.weight.copy_(new_w)
            layer.lora_a.copy_(new_a)
    else:
        state = layer.state_dict()
        state["weight"], state["lora_a"] = new_w, new_a
        layer.load_state_dict(state)


@pytest.mark.parametrize("grad", [True, False], ids=["training", "no_grad"])
@pytest.mark.parametrize("how", ["data_mul", "data_copy", "copy_under_no_grad",
                                 "load_state_dict"])
def test_the_call_after_a_write_to_w_or_a_frozen_a_sees_it(how, grad):
    layer = _layer()
    assert not layer.lora_a.requires_grad  # DoRA-FA: the W·Aᵀ term is the frozen one
    x = torch.randn(5, K)
    with torch.set_grad_enabled(grad):
        for _ in range(2):  # repeated calls: whatever could be kept from them
            layer(x)
        _write(layer, how, torch.randn(N, K), torch.randn(R, K) * 0.3)
        got = layer(x)
    want = dora64(x, layer.weight, layer.bias, layer.lora_a, layer.lora_b, layer.magnitude,
                  layer.scaling)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)


def test_a_served_peft_dora_layer_follows_a_base_weight_written_through_data():
    torch.manual_seed(0)
    plain = get_peft_model(nn.Sequential(nn.Linear(K, N)),
                           LoraConfig(r=R, lora_alpha=8, target_modules=["0"], use_dora=True))
    nonzero_b(plain)
    served = copy.deepcopy(plain)
    lfp.enable_fused(served, backend="reference")
    x = torch.randn(5, K)
    torch.testing.assert_close(served(x), plain(x))
    new = torch.randn(N, K)
    for model in (plain, served):  # weight-loading and EMA code write through .data
        model.base_model.model[0].base_layer.weight.data.copy_(new)
    torch.testing.assert_close(served(x), plain(x), rtol=1e-5, atol=1e-5)


# ---- an in-place op on the output of a bias-free DoRA layer ----

class Block(nn.Module):
    """A bias-free layer, then an in-place ReLU on its output (y is what dm needs)."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(K, N, bias=False)
        self.act = nn.ReLU(inplace=True)
        self.out = nn.Linear(N, 3)

    def forward(self, x):
        return self.out(self.act(self.proj(x)))


def _loss_and_grads(model, x):
    model.zero_grad()
    x = x.clone().requires_grad_()
    loss = model(x).square().sum()
    loss.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.requires_grad}
    return loss.detach(), x.grad, grads


def test_a_served_peft_dora_model_with_an_inplace_relu_trains_as_plain_peft():
    torch.manual_seed(0)
    plain = get_peft_model(Block(), LoraConfig(r=R, lora_alpha=8, target_modules=["proj"],
                                               use_dora=True))
    nonzero_b(plain)
    served = copy.deepcopy(plain)
    lfp.enable_fused(served, backend="reference")
    x = torch.randn(7, K)
    want = _loss_and_grads(plain, x)
    got = _loss_and_grads(served, x)
    torch.testing.assert_close(got[0], want[0])
    torch.testing.assert_close(got[1], want[1])
    assert set(got[2]) == set(want[2]) and any("magnitude" in n for n in got[2])
    for name in want[2]:
        torch.testing.assert_close(got[2][name], want[2][name], msg=name)


def _layer_block(method, inplace):
    block = Block()
    block.act = nn.ReLU(inplace=inplace)
    block.proj = lf.LowRankLinear.from_linear(block.proj, R, method, dora=True, alpha=8)
    with torch.no_grad():
        block.proj.lora_b.normal_(0, 0.3, generator=torch.Generator().manual_seed(3))
    return block


def test_our_dora_layer_with_an_inplace_relu_matches_an_out_of_place_one():
    torch.manual_seed(0)
    inplace = _layer_block("lora", True)
    out_of_place = copy.deepcopy(inplace)
    out_of_place.act = nn.ReLU(inplace=False)
    x = torch.randn(7, K)
    got, want = _loss_and_grads(inplace, x), _loss_and_grads(out_of_place, x)
    for g, w in zip(got[:2], want[:2]):
        torch.testing.assert_close(g, w)
    for name in want[2]:
        torch.testing.assert_close(got[2][name], want[2][name], msg=name)


def test_with_a_frozen_a_the_error_names_the_fix():
    """DoRA-FA keeps neither x nor Z: an in-place change of y before backward cannot be
    undone, and says so (instead of autograd's generic error)."""
    torch.manual_seed(0)
    block = _layer_block("lora_fa", True)
    with pytest.raises(InplaceOutputError, match=r"changed in place.*ReLU\(inplace=False\)"):
        block(torch.randn(7, K)).sum().backward()


def test_under_compile_an_inplace_relu_after_dora_is_handled_as_eagerly():
    """torch.compile(fullgraph=True): with A training, the eager out-of-place gradients; with A
    frozen, the same clear error."""
    torch.manual_seed(0)
    x = torch.randn(7, K)
    inplace = _layer_block("lora", True)
    out_of_place = copy.deepcopy(inplace)
    out_of_place.act = nn.ReLU(inplace=False)
    want = _loss_and_grads(out_of_place, x)
    torch._dynamo.reset()
    got = _loss_and_grads(torch.compile(inplace, backend="aot_eager", fullgraph=True), x)
    torch.testing.assert_close(got[0], want[0])
    for name in want[2]:
        torch.testing.assert_close(got[2]["_orig_mod." + name], want[2][name], msg=name)
    torch._dynamo.reset()
    frozen_a = torch.compile(_layer_block("lora_fa", True), backend="aot_eager", fullgraph=True)
    with pytest.raises(Exception, match=r"changed in place.*ReLU\(inplace=False\)"):
        frozen_a(x).sum().backward()
