"""torch.compile without graph breaks, autocast like nn.Linear, meta-device construction."""
import pytest
import torch
from torch import nn

import lowrank_fused as lf
from lowrank_fused import LowRankLinear, apply_low_rank


def small_model(method, seed=0, device=None):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(32, 48, device=device), nn.GELU(),
                          nn.Linear(48, 16, device=device))
    apply_low_rank(model, ["0", "2"], 4, method, alpha=8)
    return model


def perturb_adapters(model):
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, LowRankLinear):
                m.lora_b.normal_(0, 0.1)
                if m.latent is not None:
                    m.latent.normal_(0, 0.1)


def trainable_grads(model):
    return [p.grad.clone() for p in model.parameters() if p.requires_grad]


@pytest.mark.parametrize("method", ["lora", "lora_xs"])
def test_compile_fullgraph_matches_eager(method):
    torch._dynamo.reset()
    model = small_model(method)
    perturb_adapters(model)
    x = torch.randn(3, 5, 32, requires_grad=True)
    compiled = torch.compile(model, fullgraph=True)  # fullgraph: any graph break raises
    y_c = compiled(x)
    y_c.square().sum().backward()
    grads_c, gx_c = trainable_grads(model), x.grad.clone()
    model.zero_grad()
    x.grad = None
    y_e = model(x)
    y_e.square().sum().backward()
    torch.testing.assert_close(y_c, y_e, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gx_c, x.grad, rtol=1e-4, atol=1e-4)
    for gc, ge in zip(grads_c, trainable_grads(model)):
        torch.testing.assert_close(gc, ge, rtol=1e-4, atol=1e-4)


def test_compile_fullgraph_survives_new_sequence_lengths():
    """A new M recompiles with a symbolic M (automatic dynamic shapes); the backend choice must
    still trace with no graph break, and the result still match eager."""
    torch._dynamo.reset()
    model = small_model("lora")
    perturb_adapters(model)
    compiled = torch.compile(model, fullgraph=True)
    for seq in (5, 7, 9):
        x = torch.randn(3, seq, 32, requires_grad=True)
        y = compiled(x)
        y.sum().backward()
        torch.testing.assert_close(y, model(x), rtol=1e-5, atol=1e-5)


def test_compiled_op_has_no_graph_break():
    torch._dynamo.reset()
    layer = LowRankLinear(16, 8, 2, method="lora_fa", dropout=0.1)
    explanation = torch._dynamo.explain(layer)(torch.randn(4, 16))
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_autocast_behaves_like_linear(dtype):
    torch.manual_seed(0)
    base = nn.Linear(24, 12)
    layer = LowRankLinear.from_linear(nn.Linear(24, 12), 4, "lora")
    layer.weight.data.copy_(base.weight.data)
    layer.bias.data.copy_(base.bias.data)
    x = torch.randn(6, 24, requires_grad=True)
    with torch.autocast("cpu", dtype=dtype):
        y_base = base(x)
        y = layer(x)  # B = 0: exactly the base layer's autocast output
    assert y.dtype == y_base.dtype == dtype
    torch.testing.assert_close(y, y_base, rtol=0, atol=0)

    perturb_adapters(layer)
    with torch.autocast("cpu", dtype=dtype):
        y = layer(x)
    y.float().sum().backward()
    assert layer.lora_a.dtype == layer.lora_a.grad.dtype == torch.float32
    assert layer.lora_b.grad.dtype == torch.float32 and x.grad.dtype == torch.float32
    # The low-rank branch stayed in float32: compare with a hand composition.
    p = x.detach() @ layer.lora_a.detach().T
    low_rank = layer.scaling * (p @ layer.lora_b.detach().T)
    with torch.autocast("cpu", dtype=dtype):
        base_out = base(x.detach())
    torch.testing.assert_close(y.detach(), (base_out.float() + low_rank).to(dtype),
                               rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("method", ["lora", "lora_fa", "lora_xs"])
def test_meta_device_construction_then_to_empty(method):
    real = nn.Sequential(nn.Linear(20, 30), nn.ReLU(), nn.Linear(30, 10))
    base_state = {k: v.clone() for k, v in real.state_dict().items()}
    apply_low_rank(real, ["0", "2"], 3, method, generator=torch.Generator().manual_seed(5))

    with torch.device("meta"):
        meta = nn.Sequential(nn.Linear(20, 30), nn.ReLU(), nn.Linear(30, 10))
    apply_low_rank(meta, ["0", "2"], 3, method)
    assert all(p.is_meta for p in meta.parameters())
    meta.to_empty(device="cpu")
    # materialise: pretrained base weights, then adapters initialised from them
    missing, _ = meta.load_state_dict(base_state, strict=False)
    assert all(k.rsplit(".", 1)[-1] in ("lora_a", "lora_b", "latent", "_extra_state")
               for k in missing)
    generator = torch.Generator().manual_seed(5)
    for m in meta.modules():
        if isinstance(m, LowRankLinear):
            m.reset_adapters(generator)
    x = torch.randn(4, 20)
    torch.testing.assert_close(meta(x), real(x), rtol=0, atol=0)
    assert {n for n, p in meta.named_parameters() if p.requires_grad} == \
        {n for n, p in real.named_parameters() if p.requires_grad}


def test_fake_tensor_shapes():
    from torch._subclasses.fake_tensor import FakeTensorMode
    with FakeTensorMode():
        x = torch.empty(2, 7, 16)
        w, a, b, r = torch.empty(8, 16), torch.empty(3, 16), torch.empty(8, 3), torch.empty(3, 3)
        y = lf.low_rank_linear(x, w, a, b, latent=r)
    assert y.shape == (2, 7, 8)
