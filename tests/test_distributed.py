"""DDP (gloo, 2 CPU processes) gives one process's gradients; FSDP2 wraps the layer."""
import tempfile

import pytest
import torch
import torch.distributed as dist
from torch import nn

from distributed_helpers import WORLD, init_gloo, write_result
from distributed_helpers import run_two_processes as run_workers
from lowrank_fused import LowRankLinear, apply_low_rank

GLOBAL_BATCH = 8


def build(method):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 20), nn.Tanh(), nn.Linear(20, 6)).double()
    apply_low_rank(model, ["0", "2"], 3, method, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, LowRankLinear):
                m.lora_b.normal_(0, 0.1, generator=torch.Generator().manual_seed(2))
    return model


def batch():
    g = torch.Generator().manual_seed(3)
    return (torch.randn(GLOBAL_BATCH, 12, generator=g, dtype=torch.float64),
            torch.randn(GLOBAL_BATCH, 6, generator=g, dtype=torch.float64))


def single_process_grads(method):
    model = build(method)
    x, t = batch()
    nn.functional.mse_loss(model(x), t).backward()
    return {n: p.grad for n, p in model.named_parameters() if p.requires_grad}


def _worker(rank, method, wrapper, out_dir):
    init_gloo(rank, out_dir)
    try:
        model = build(method)
        names = [n for n, p in model.named_parameters() if p.requires_grad]
        if wrapper == "ddp":
            wrapped = nn.parallel.DistributedDataParallel(model)
        else:
            from torch.distributed.fsdp import fully_shard
            for m in model.modules():
                if isinstance(m, LowRankLinear):
                    fully_shard(m)
            wrapped = fully_shard(model)
        x, t = batch()
        shard = slice(rank * GLOBAL_BATCH // WORLD, (rank + 1) * GLOBAL_BATCH // WORLD)
        nn.functional.mse_loss(wrapped(x[shard]), t[shard]).backward()
        grads = {}
        for n, p in model.named_parameters():
            if p.requires_grad:
                g = p.grad
                if hasattr(g, "full_tensor"):  # FSDP2 keeps DTensor shards
                    g = g.full_tensor()
                grads[n] = g.detach().clone()
        assert set(grads) == set(names)
    except BaseException:
        dist.destroy_process_group()
        raise
    write_result(rank, out_dir, grads)


def run_two_processes(method, wrapper, deadline_s=120):
    """Rank 0's gradients."""
    with tempfile.TemporaryDirectory() as out_dir:
        return run_workers(_worker, (method, wrapper), out_dir, deadline_s)


@pytest.mark.parametrize("method", ["lora", "lora_xs"])
def test_ddp_gloo_matches_single_process(method):
    got = run_two_processes(method, "ddp")
    want = single_process_grads(method)
    assert set(got) == set(want) and got
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-10, atol=1e-12, msg=name)


def _fsdp2_on_cpu_supported():
    try:
        from torch.distributed.fsdp import fully_shard  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.mark.skipif(not _fsdp2_on_cpu_supported(),
                    reason="this torch has no torch.distributed.fsdp.fully_shard (FSDP2)")
def test_fsdp2_fully_shard_matches_single_process():
    got = run_two_processes("lora_fa", "fsdp2")
    want = single_process_grads("lora_fa")
    assert set(got) == set(want) and got
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-10, atol=1e-12, msg=name)
