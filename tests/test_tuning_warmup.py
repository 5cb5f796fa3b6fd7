"""lowrank_fused.warmup: one forward and backward that decides every distinct key of a model,
with progress, leaving the model's gradients, buffers and the RNG states as they were (also
when it fails). Layers here ask a test Tuner for their keys as the integrated operator will."""
import random
import sys

import pytest
import torch
from torch import nn

import lowrank_fused
from lowrank_fused.tuning import Tuner, TuningKey
from lowrank_fused.tuning.environment import Environment

H100 = Environment("NVIDIA H100 80GB HBM3", "9.0", "550.54.15", "12.4", "2.11.0", "3.6.0",
                   "0.1.0", "0123456789abcdef")


def key(op, n):
    return TuningKey.of(op, torch.float32, torch.float32, "lora", 16, n, 8, 4)


class Layer(nn.Module):
    """Linear, batch norm and dropout; asks for its forward key in forward and its backward key
    when the gradient reaches its output, as the operator will."""

    def __init__(self, tuner, n, fail=False):
        super().__init__()
        self.tuner, self.n, self.fail = tuner, n, fail
        self.linear = nn.Linear(8, n)
        self.norm = nn.BatchNorm1d(n)
        self.drop = nn.Dropout(0.5)
        self.back = nn.Linear(n, 8)

    def forward(self, x):
        runs = {"triton": lambda: None, "reference": lambda: None}
        self.tuner.decide(key("forward", self.n), runs)
        y = self.drop(self.norm(self.linear(x)))
        if self.fail:
            raise RuntimeError("a layer failed")
        y.register_hook(lambda g: self.tuner.decide(key("backward", self.n), runs) and None)
        return self.back(y)


@pytest.fixture
def tuner(tmp_path):
    return Tuner(cache_dir=tmp_path / "cache", table=tmp_path / "no-table.json",
                 environment=H100, timer=lambda fn: 1e-3)


def model_of(tuner, widths=(16, 32, 16), fail_at=None):
    torch.manual_seed(0)
    return nn.Sequential(*[Layer(tuner, n, fail=i == fail_at) for i, n in enumerate(widths)])


def state_of(model) -> dict:
    return {"grads": {n: (p.grad, None if p.grad is None else p.grad.clone())
                      for n, p in model.named_parameters()},
            "buffers": {n: (b, b.clone()) for n, b in model.named_buffers()},
            "params": {n: p.detach().clone() for n, p in model.named_parameters()}}


def assert_same_state(model, before) -> None:
    for name, p in model.named_parameters():
        grad, value = before["grads"][name]
        assert p.grad is grad, name  # the very tensor (or None) the caller had
        if grad is not None:
            assert torch.equal(p.grad, value), name
        assert torch.equal(p.detach(), before["params"][name]), name
    for name, b in model.named_buffers():
        tensor, value = before["buffers"][name]
        assert b is tensor and torch.equal(b, value), name


def rng_draws():
    return torch.rand(4), random.random()


def test_warmup_decides_each_distinct_key_once_with_progress(tuner, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "tqdm.auto", None)  # no tqdm: plain lines
    model = model_of(tuner)
    rows = lowrank_fused.warmup(model, torch.randn(16, 8), tuner=tuner)
    assert sorted(r["key"] for r in rows) == sorted(
        key(op, n).id for op in ("forward", "backward") for n in (16, 32))
    assert {r["source"] for r in rows} == {"timed now"}
    err = capsys.readouterr().err
    assert err.count("lowrank_fused warmup: key ") == 4
    assert "4 keys (4 timed now)" in err
    # a second warmup finds them decided: nothing new
    assert lowrank_fused.warmup(model, torch.randn(16, 8), tuner=tuner, progress=False) == []


def test_warmup_with_tqdm_counts_keys(tuner, capsys):
    pytest.importorskip("tqdm")
    lowrank_fused.warmup(model_of(tuner, (16,)), torch.randn(16, 8), tuner=tuner)
    assert "2 keys (2 timed now)" in capsys.readouterr().err


def test_warmup_leaves_grads_buffers_and_rng_as_they_were(tuner):
    model = model_of(tuner)
    model[0].linear.weight.grad = torch.full_like(model[0].linear.weight, 7.0)
    model[1].back.bias.grad = torch.ones_like(model[1].back.bias)
    before = state_of(model)
    batch = (torch.randn(16, 8),)
    rng = (torch.get_rng_state(), random.getstate())
    lowrank_fused.warmup(model, batch, tuner=tuner, progress=False)  # dropout draws
    after_warmup = rng_draws()
    torch.set_rng_state(rng[0])
    random.setstate(rng[1])
    expected = rng_draws()
    assert torch.equal(after_warmup[0], expected[0]) and after_warmup[1] == expected[1]
    assert_same_state(model, before)
    assert model.training


def test_a_failing_warmup_raises_and_leaves_the_model_as_it_was(tuner):
    model = model_of(tuner, fail_at=1)  # layer 0 updates its batch-norm statistics first
    model[2].linear.weight.grad = torch.full_like(model[2].linear.weight, 3.0)
    before = state_of(model)
    batch = {"input": torch.randn(16, 8)}
    rng = torch.get_rng_state()
    with pytest.raises(RuntimeError, match="a layer failed"):
        lowrank_fused.warmup(model, batch, tuner=tuner, progress=False)
    assert_same_state(model, before)
    assert torch.equal(torch.get_rng_state(), rng)


@pytest.mark.parametrize("args,message", [
    ((object(), torch.randn(2, 8)), "torch.nn.Module"),
    (("model", 3), "example_batch"),
])
def test_bad_arguments_are_refused_before_anything_runs(tuner, args, message):
    model = model_of(tuner)
    call = (model if args[0] == "model" else args[0], args[1])
    with pytest.raises(TypeError, match=message):
        lowrank_fused.warmup(*call, tuner=tuner)
    with pytest.raises(TypeError, match="loss_fn"):
        lowrank_fused.warmup(model, torch.randn(2, 8), loss_fn=3, tuner=tuner)
    assert tuner.report() == []


def test_warmup_runs_a_low_rank_model_and_leaves_it_untouched(capsys):
    """The real layer on this CPU (the reference backend: nothing to tune yet): forward and
    backward run through a custom loss, and no gradient is left behind."""
    torch.manual_seed(0)
    model = nn.Sequential(lowrank_fused.LowRankLinear(8, 16, 4, method="lora_fa", dropout=0.1),
                          nn.GELU(), lowrank_fused.LowRankLinear(16, 8, 4))
    before = state_of(model)
    seen = []

    def loss_fn(output):
        seen.append(output.shape)
        return output.pow(2).mean()
    lowrank_fused.warmup(model, torch.randn(4, 8), loss_fn=loss_fn, progress=False)
    assert seen == [torch.Size([4, 8])]
    assert_same_state(model, before)
