"""What each method keeps for backward, counted with saved_tensors_hooks."""
import pytest
import torch
from torch import nn

from lowrank_fused import LowRankLinear
from lowrank_fused.saved_activations import SavedActivations

M_SHAPE, K, N, R = (4, 9), 48, 40, 6
M = M_SHAPE[0] * M_SHAPE[1]


def saved_activations(layer, x):
    """Tensors autograd keeps for backward of layer(x), parameters excluded."""
    with SavedActivations(layer) as saved:
        loss = layer(x).sum()
    loss.backward()
    return saved.tensors


@pytest.mark.parametrize("method", ["lora_fa", "lora_xs"])
@pytest.mark.parametrize("dropout", [0.0, 0.2])
def test_frozen_a_keeps_only_the_rank_r_activation(method, dropout):
    layer = LowRankLinear(K, N, R, method=method, dropout=dropout)
    x = torch.randn(*M_SHAPE, K, requires_grad=True)
    saved = saved_activations(layer, x)
    assert all(t.numel() != M * K for t in saved), [tuple(t.shape) for t in saved]
    assert sum(t.numel() for t in saved) == M * R, [tuple(t.shape) for t in saved]


def test_lora_keeps_x_and_p():
    layer = LowRankLinear(K, N, R, method="lora")
    x = torch.randn(*M_SHAPE, K, requires_grad=True)
    saved = saved_activations(layer, x)
    assert sorted(t.numel() for t in saved) == sorted([M * K, M * R])


def test_frozen_everything_but_x_keeps_nothing():
    layer = LowRankLinear(K, N, R, method="lora_fa")
    layer.lora_b.requires_grad_(False)
    x = torch.randn(*M_SHAPE, K, requires_grad=True)
    assert saved_activations(layer, x) == []


def test_counter_skips_parameters_and_counts_each_storage_once():
    linear = torch.nn.Linear(K, N)
    x = torch.randn(M, K, requires_grad=True)
    with SavedActivations(linear) as saved:
        y = linear(x)  # saves x and the weight (a parameter: not counted)
        loss = (y * y).sum()  # saves y twice: one storage
    loss.backward()
    assert saved.shapes() == [(M, K), (M, N), (M, N)]
    assert saved.nbytes == (M * K + M * N) * x.element_size()


def test_a_parameter_given_new_storage_mid_forward_is_still_not_an_activation():
    # bitsandbytes does this to a CPU 4-bit weight between eval and training (.data replaced)
    class Repacking(nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = nn.Parameter(torch.randn(8, 16), requires_grad=False)  # frozen

        def forward(self, x):
            self.weight.data = self.weight.data.clone()  # a new storage, the old one freed
            return x @ self.weight.T  # autograd saves the weight alone (for x's gradient)

    module = Repacking()
    x = torch.randn(4, 16, requires_grad=True)
    with SavedActivations(module) as saved:
        module(x)
    assert saved.nbytes == 0  # the weight, the only saved tensor, is a parameter
