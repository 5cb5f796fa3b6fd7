"""DDP (gloo, 2 CPU processes) gives one process's gradients; FSDP2 wraps the layer."""
import os
import time
import socket
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from lowrank_fused import LowRankLinear, apply_low_rank

WORLD = 2
GLOBAL_BATCH = 8


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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


def _worker(rank, port, method, wrapper, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
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
        if rank == 0:
            torch.save(grads, os.path.join(out_dir, "grads.pt"))
    finally:
        dist.destroy_process_group()


def run_two_processes(method, wrapper):
    with tempfile.TemporaryDirectory() as out_dir:
        ctx = mp.start_processes(_worker, args=(free_port(), method, wrapper, out_dir),
                                 nprocs=WORLD, join=False, start_method="spawn")
        deadline_s = 120
        end = time.monotonic() + deadline_s
        while not ctx.join(timeout=5):
            if time.monotonic() > end:
                for p in ctx.processes:
                    p.kill()
                pytest.fail(f"{wrapper} workers did not finish within {deadline_s} s")
        return torch.load(os.path.join(out_dir, "grads.pt"))


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
