"""lowrank_fused.stats: the operator counts its calls per name and backend where it dispatches,
eagerly, under activation checkpointing and under torch.compile (without recompiling)."""
import torch
from torch.utils.checkpoint import checkpoint

from lowrank_fused import stats
from lowrank_fused.functional import low_rank_linear


def _tensors(a_trains=True):
    torch.manual_seed(0)
    x = torch.randn(5, 12, requires_grad=True)
    w = torch.randn(7, 12)
    a = torch.randn(3, 12, requires_grad=a_trains)
    b = torch.randn(7, 3, requires_grad=True)
    return x, w, a, b


def test_forward_and_backward_are_counted_per_name_and_backend():
    stats.reset()
    x, w, a, b = _tensors()
    for _ in range(3):
        low_rank_linear(x, w, a, b, backend="reference", name="layer.0").sum().backward()
    low_rank_linear(x, w, a, b, backend="reference")  # unnamed
    got = stats.snapshot()
    assert got["layer.0"] == {"reference": {"forward": 3, "backward": 3}}
    assert got[None] == {"reference": {"forward": 1}}
    stats.reset(["layer.0"])
    assert "layer.0" not in stats.snapshot() and None in stats.snapshot()
    stats.reset()
    assert stats.snapshot() == {}


def test_a_checkpointed_forward_run_again_in_backward_counts_as_recompute():
    stats.reset()
    x, w, a, b = _tensors()
    y = checkpoint(lambda t: low_rank_linear(t, w, a, b, backend="reference", name="ckpt"), x,
                   use_reentrant=False)
    y.sum().backward()
    assert stats.snapshot()["ckpt"]["reference"] == {"forward": 1, "recompute": 1, "backward": 1}


def test_counting_under_torch_compile_adds_no_recompile():
    torch._dynamo.reset()
    stats.reset()
    x, w, a, b = _tensors(a_trains=False)
    frames = []

    def backend(gm, example_inputs):
        frames.append(gm)
        return gm.forward

    fn = torch.compile(lambda t: low_rank_linear(t, w, a, b, backend="reference", name="c"),
                       backend=backend, fullgraph=True)
    for _ in range(10):
        fn(x).sum().backward()
    assert stats.snapshot()["c"]["reference"] == {"forward": 10, "backward": 10}
    assert len(frames) == 1
