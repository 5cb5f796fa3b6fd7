"""apply_low_rank: which layers change, trainable counts as in the papers, training matches naive."""
import copy

import pytest
import torch
from torch import nn

from lowrank_fused import LowRankLinear, apply_low_rank

D, FF, LAYERS = 16, 40, 3


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = (nn.Linear(D, D) for _ in range(4))
        self.up_proj, self.down_proj = nn.Linear(D, FF), nn.Linear(FF, D)
        self.norm = nn.LayerNorm(D)

    def forward(self, x):
        h = self.norm(x)
        att = torch.softmax(self.q_proj(h) @ self.k_proj(h).transpose(-1, -2) / D ** 0.5, -1)
        x = x + self.o_proj(att @ self.v_proj(h))
        return x + self.down_proj(torch.relu(self.up_proj(self.norm(x))))


def make_model(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(*(Block() for _ in range(LAYERS)), nn.Linear(D, 3)).double()


@pytest.mark.parametrize("method, per_layer", [
    ("lora", lambda r, k, n: r * (k + n)),
    ("lora_fa", lambda r, k, n: r * n),
    ("lora_xs", lambda r, k, n: r * r),
])
def test_trainable_counts_match_papers(method, per_layer):
    model = make_model()
    summary = apply_low_rank(model, ["q_proj", "v_proj", "up_proj"], 4, method)
    assert len(summary.replaced) == 3 * LAYERS
    expected = LAYERS * (2 * per_layer(4, D, D) + per_layer(4, D, FF))
    assert summary.trainable_parameters == expected
    assert summary.total_parameters > expected
    assert sum(isinstance(m, LowRankLinear) for m in model.modules()) == 3 * LAYERS
    assert isinstance(model[0].k_proj, nn.Linear) and not isinstance(model[0].k_proj, LowRankLinear)
    trainable = {n.rsplit(".", 1)[-1] for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"lora": {"lora_a", "lora_b"}, "lora_fa": {"lora_b"},
                         "lora_xs": {"latent"}}[method]
    assert "trainable params" in str(summary)


def test_roberta_large_lora_xs_count_from_the_paper():
    # LoRA-XS on RoBERTa-large's 24 layers: query, value, attention output, FC1 at r = 25 -> 60,000
    # trainable parameters (the paper's count; independent of the hidden size, shrunk here).
    model = nn.ModuleDict({f"l{i}": nn.ModuleDict({
        "query": nn.Linear(32, 32), "value": nn.Linear(32, 32), "attn_out": nn.Linear(32, 32),
        "fc1": nn.Linear(32, 128)}) for i in range(24)})
    summary = apply_low_rank(model, ["query", "value", "attn_out", "fc1"], 25, "lora_xs")
    assert summary.trainable_parameters == 60_000


class NaiveAdapter(nn.Module):
    """The composition of plain torch ops, holding copies of a LowRankLinear's tensors."""

    def __init__(self, layer: LowRankLinear):
        super().__init__()
        self.base = nn.Linear(layer.in_features, layer.out_features).double()
        self.base.weight = nn.Parameter(layer.weight.detach().clone(), requires_grad=False)
        self.base.bias = nn.Parameter(layer.bias.detach().clone(), requires_grad=False)
        self.a = nn.Parameter(layer.lora_a.detach().clone(), requires_grad=layer.lora_a.requires_grad)
        self.b = nn.Parameter(layer.lora_b.detach().clone(), requires_grad=layer.lora_b.requires_grad)
        self.r = None if layer.latent is None else nn.Parameter(layer.latent.detach().clone())
        self.s = layer.scaling

    def forward(self, x):
        p = x @ self.a.T
        if self.r is not None:
            p = p @ self.r
        return self.base(x) + self.s * (p @ self.b.T)


@pytest.mark.parametrize("method", ["lora", "lora_fa", "lora_xs"])
def test_optimizer_steps_match_naive(method):
    ours = make_model()
    apply_low_rank(ours, ["q_proj", "v_proj", "o_proj", "down_proj"], 3, method, alpha=6)
    naive = copy.deepcopy(ours)
    for name, module in list(naive.named_modules()):
        if isinstance(module, LowRankLinear):
            parent, _, child = name.rpartition(".")
            setattr(naive.get_submodule(parent), child, NaiveAdapter(module))

    opts = [torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-2)
            for m in (ours, naive)]
    torch.manual_seed(1)
    x, target = torch.randn(4, 5, D, dtype=torch.float64), torch.randn(4, 5, 3, dtype=torch.float64)
    for _ in range(4):
        losses = []
        for model, opt in zip((ours, naive), opts):
            opt.zero_grad()
            loss = torch.nn.functional.mse_loss(model(x), target)
            loss.backward()
            opt.step()
            losses.append(loss.detach())
        torch.testing.assert_close(losses[0], losses[1], rtol=1e-10, atol=1e-12)
    assert losses[0] < 10  # sanity: a finite loss
    trained_ours = [p for p in ours.parameters() if p.requires_grad]
    trained_naive = [p for p in naive.parameters() if p.requires_grad]
    assert len(trained_ours) == len(trained_naive) > 0
    for a, b in zip(trained_ours, trained_naive):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
